"""What a training run reports: log lines, the metrics rows (progress bar, metrics.jsonl, TensorBoard), model FLOPs."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from llasm_jax import paths
from llasm_jax.models.llasm import LlasmConfig
from llasm_jax.train.losses import loss_options, needs_teacher


def log(*args) -> None:
  """One line on process 0, above the progress bar."""
  if jax.process_index() == 0:
    tqdm.write(" ".join(str(a) for a in args))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows every run in `workdir` logged (WORKDIR/metrics.jsonl), one per step: a resumed run's
  rows replace those of the steps it ran again."""
  path = paths.resolve(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  by_step = {r["step"]: r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))}
  return [by_step[s] for s in sorted(by_step)]


class Metrics:
  """One line per logging interval on process 0, a progress bar, TensorBoard event files."""

  def __init__(self, workdir: str, config, total_steps: int, start_step: int,
               flops_per_step: Callable[[int], float] | None):
    """flops_per_step(T): the model FLOPs of a step whose rows are T tokens long."""
    self.every = config.train.log_every
    self.workdir = workdir
    self.flops_per_step = flops_per_step
    self.peak = config.train.get("peak_tflops_per_device")
    self.is_main = jax.process_index() == 0
    self.writer = None
    if self.is_main:
      from tensorboardX import SummaryWriter

      self.writer = SummaryWriter(paths.join(workdir, "tensorboard"))  # gs:// too (tensorboardX uploads)
    self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not self.is_main,
                    dynamic_ncols=True)
    self.window: list[dict] = []
    self.t0 = time.perf_counter()
    self.history: list[dict] = []
    # Seconds spent training up to `start_step`, carried over resumed runs (config.train.max_minutes).
    self.trained = max((r.get("trained_s", 0.0) for r in read_metrics(workdir) if r["step"] <= start_step),
                       default=0.0)

  def step(self, step: int, metrics: dict[str, jax.Array], tokens: int, schedule, length: int) -> None:
    """`tokens`: the step's real tokens; `length`: its row length T (FLOPs follow the padded rows)."""
    self.bar.update(1)
    self.window.append(dict(metrics=metrics, tokens=tokens,
                            flops=self.flops_per_step(length) if self.flops_per_step else 0.0))
    if step % self.every:
      return
    values = [{k: float(v) for k, v in w["metrics"].items()} for w in self.window]  # syncs once per interval
    lr = float(schedule(step - 1))  # the rate the last step used
    seconds = (time.perf_counter() - self.t0) / len(self.window)
    self.trained += seconds * len(self.window)
    tokens_s = sum(w["tokens"] for w in self.window) / (seconds * len(self.window))
    row = dict(step=step, loss=float(np.mean([v["loss"] for v in values])), grad_norm=values[-1]["grad_norm"],
               lr=lr, tokens_per_s=tokens_s, s_per_step=seconds, nonfinite_steps=int(values[-1]["nonfinite_steps"]),
               trained_s=self.trained)
    line = f"step {step:>6} | loss {row['loss']:.4f}"
    if "kd" in values[-1]:  # a distilling loss: its two terms, each a mean per target token
      row.update(ce=float(np.mean([v["ce"] for v in values])), kd=float(np.mean([v["kd"] for v in values])))
      line += f" (ce {row['ce']:.4f}, kd {row['kd']:.4f})"
    if "ctc" in values[-1]:  # CTC alone or beside the main loss: its mean per transcript token
      row.update(ctc=float(np.mean([v["ctc"] for v in values])),
                 ctc_infeasible=int(sum(v["ctc_infeasible"] for v in values)))
      if "ce" in values[-1] and "kd" not in values[-1]:
        row["ce"] = float(np.mean([v["ce"] for v in values]))
        line += f" (ce {row['ce']:.4f}, ctc {row['ctc']:.4f})"
      else:
        line += f" (ctc {row['ctc']:.4f})"
      rows = sum(v["ctc_rows"] for v in values)
      if rows and row["ctc_infeasible"] > 0.05 * rows:
        log(f"warning: {row['ctc_infeasible']} of {int(rows)} rows with a transcript have fewer adaptor frames than "
            "CTC needs (tokens + repeats) and train no CTC. Check that adaptor frames outnumber target tokens "
            "(stack factor): a smaller config.model.stack_factor (a new adaptor) gives more frames per second")
    line += f" | grad norm {row['grad_norm']:.3f} | lr {lr:.2e} | {tokens_s:,.0f} tok/s | {seconds:.3f} s/step"
    if self.flops_per_step:
      tflops = sum(w["flops"] for w in self.window) / (seconds * len(self.window)) / 1e12 / jax.device_count()
      row["tflops_per_device"] = tflops
      line += f" | {tflops:.3g} TFLOP/s/device"
      if self.peak:
        row["mfu"] = tflops / self.peak
        line += f" | MFU {100 * row['mfu']:.1f}%"
    if row["nonfinite_steps"]:
      line += f" | skipped non-finite {row['nonfinite_steps']}"
    empty = sum(v["target_tokens"] == 0 for v in values)
    if empty:
      line += (f" | {empty} steps without target tokens (texts cut at config.data.seq_len? raise it)")
    log(line)
    self.history.append(row)
    if self.is_main:  # every logged row, kept over resumed runs (plots, the demo's report)
      paths.append_text(paths.join(self.workdir, "metrics.jsonl"), json.dumps(row) + "\n")
    if self.writer is not None:
      for k, v in row.items():
        if k != "step":
          self.writer.add_scalar(f"train/{k}", v, step)
      self.writer.flush()
    self.window, self.t0 = [], time.perf_counter()

  def close(self) -> None:
    self.bar.close()
    if self.writer is not None:
      self.writer.close()


def model_flops_per_step(cfg: LlasmConfig, config, trainable_llm: bool, whisper: bool = True,
                         seq_len: int | None = None) -> float:
  """Model FLOPs of one step (the MFU numerator): 2 per weight per token forward, 2 more for
  activation gradients (the adaptor's gradients flow through the LLM), 2 more for weight
  gradients of trainable weights; attention scores as in the PaLM appendix; Whisper forward
  (`whisper=False`: cached features, no Whisper in the step); a distilling loss's teacher
  forward (2 per weight per teacher token, seq_len of them per row, no backward). `seq_len`: the
  step's row length T (a length bucket), default config.data.seq_len."""
  llm, w = cfg.llm, cfg.audio
  t = seq_len or config.data.seq_len
  tokens = config.train.batch_size * t
  h = llm.kv_head_dim
  llm_weights = llm.num_hidden_layers * (
      llm.hidden_size * h * (llm.num_attention_heads * 2 + llm.num_key_value_heads * 2)
      + 3 * llm.hidden_size * llm.intermediate_size) + llm.hidden_size * llm.vocab_size
  attn = 2 * llm.num_hidden_layers * t * llm.num_attention_heads * h  # per token, causal average
  llm_flops = tokens * ((6 if trainable_llm else 4) * llm_weights + (3 if trainable_llm else 2) * 2 * attn)
  if needs_teacher(config):
    llm_flops += tokens * (2 * llm_weights + 2 * attn)
  if loss_options(config.train)[0] == "ctc":  # no LLM pass (the CTC head is not counted either)
    llm_flops = 0
  frames = w.max_source_positions if cfg.padded_mel else config.data.get("mel_frames", 3000) // 2
  enc = w.encoder_layers * (4 * w.d_model ** 2 + 2 * w.d_model * w.encoder_ffn_dim)
  audios = config.train.batch_size * config.data.max_audios
  whisper_flops = 2 * audios * frames * enc
  if cfg.with_decoder:  # "decoder" mode: at most audio_token_len steps, one token each
    dec = w.decoder_layers * (8 * w.d_model ** 2 + 2 * w.d_model * w.decoder_ffn_dim)
    whisper_flops += 2 * audios * cfg.audio_token_len * dec
  return float(llm_flops + (whisper_flops if whisper else 0))
