"""Stage-2 train-step throughput with sequence packing (config.data.packing) against padded rows.

  python bench/packing_speed.py [--widths 256,512] [--samples 96] [--batch 4] [--seq-len 2048] [--rounds 12]
      [--out FILE.json]

The same samples go through the jitted stage-2 train step (adaptor + LLM train, AdamW, float32)
three ways: one sample per row padded to seq_len ("padded"), one per row padded to the length
bucket of the batch's longest ("buckets", 256/512/1024/2048), and packed by the pipeline's own
`packing.Pack` + `pipeline.Collate` in windows of 128 samples into rows of seq_len tokens and
8 audio slots ("packed"). Lengths follow a lognormal like instruction data (median 300 tokens,
a tail clipped at seq_len); each sample is text-heavy: one 1-3 s audio (13-38 audio tokens in
3 s encoder-mode windows), a prompt and a long answer. The models are small LLaMAs (2 layers of
each `--widths` width, vocab 2048) under the tiny Whisper, so 2 CPU cores give numbers within
minutes. Packed rows run the full T x T attention of a row (XLA's attention computes masked
blocks too), which at width 256 and T=2048 costs about what the matmuls do, at 512 half of it,
at 7B a tenth: the wider model is the nearer to the gain at scale.

Throughput = non-padding tokens / step time, summed over `--rounds` steps of each way after every
shape has been compiled (compile time left out), the ways taking turns step by step so that other
load on the machine slows them alike; the batches are made before timing (in training, grain
workers make them beside the step). The load average is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_name  # noqa: E402  (bench/machine.py, beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def llm(width: int) -> dict:
  """The small LLaMA of one width: LLaMA's MLP ratio (2.75), 64-wide heads."""
  return dict(hidden_size=width, intermediate_size=int(2.75 * width), num_hidden_layers=2,
              num_attention_heads=width // 64, num_key_value_heads=width // 64, vocab_size=2048,
              max_position_embeddings=2048)
WINDOW_FRAMES = 300  # 3 s encoder-mode audio windows
BUCKETS = (256, 512, 1024, 2048)


def machine() -> dict:
  import jax

  return {"device": f"{jax.devices()[0].platform} x{jax.device_count()}", "cpu": cpu_name(), "cores": os.cpu_count(),
          "jax": jax.__version__}


def load() -> float:
  return round(os.getloadavg()[0], 2)


def make_samples(cfg, n: int, seq_len: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """`n` samples as `pipeline.Featurize` gives them: ids/labels int32[len], one audio slot (mel)."""
  from llasm_jax.tokens import IGNORE

  rng = np.random.default_rng(seed)
  lengths = np.clip(np.rint(rng.lognormal(np.log(300), 0.7, n)), 64, seq_len).astype(int)
  low = min(cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id)
  out = []
  for length in lengths:
    frames = int(rng.integers(100, WINDOW_FRAMES + 1))
    p = cfg.audio_tokens(frames)
    text = int(length) - p - 4
    prompt = rng.integers(3, low, max(2, text // 10)).tolist()
    answer = rng.integers(3, low, text - len(prompt)).tolist()
    ids = [cfg.llm.bos_token_id, *prompt, cfg.audio_start_id, *[cfg.audio_patch_id] * p, cfg.audio_end_id,
           *answer, cfg.llm.eos_token_id]
    labels = np.full(len(ids), IGNORE, np.int32)
    labels[-len(answer) - 1:] = ids[-len(answer) - 1:]
    mel = np.zeros((1, cfg.audio.num_mel_bins, WINDOW_FRAMES), np.float32)
    mel[0, :, :frames] = rng.uniform(-1.0, 1.0, (cfg.audio.num_mel_bins, frames))
    out.append({"input_ids": np.int32(ids), "labels": labels, "mel": mel, "mel_lengths": np.int32([frames])})
  return out


def make_batches(cfg, samples, how: str, batch: int, seq_len: int) -> list[dict[str, np.ndarray]]:
  """The samples as host batches of `batch` rows: "padded", "buckets" or "packed"."""
  from llasm_jax.data import contract, packing, pipeline

  kw = dict(seq_len=seq_len, mel_frames=WINDOW_FRAMES)
  if how == "packed":
    pcfg = pipeline.PipelineConfig.from_model(cfg, max_audios=8, packing=True, **kw)
    pack = packing.Pack(seq_len, pcfg.max_audios)
    rows = [r for w in range(0, len(samples), pcfg.pack_window)
            for r in packing.window_rows(pack(samples[w:w + pcfg.pack_window]))]
  else:
    buckets = tuple(b for b in BUCKETS if b < seq_len) + (seq_len,) if how == "buckets" else None
    pcfg = pipeline.PipelineConfig.from_model(cfg, max_audios=1, buckets=buckets, **kw)
    rows = samples
  collate = pipeline.Collate(pcfg, 0)
  out = [collate(rows[i:i + batch]) for i in range(0, len(rows) - batch + 1, batch)]
  for b in out:
    contract.check_batch(b, cfg)
  return out


class Way:
  """One way's batches, its own train state and its step compiled for each of its batch shapes."""

  def __init__(self, cfg, config, batches):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from llasm_jax.models.llasm import Llasm
    from llasm_jax.train.optim import make_optimizer, param_labels
    from llasm_jax.train.step import TrainState, make_train_step

    model = Llasm(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    labels = param_labels(params, config.train.trainable)
    tx = make_optimizer(config.optim, labels, 1000)
    self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.key(0)))
    step = jax.jit(make_train_step(graphdef, tx, labels, grad_accum=1))
    self.batches, self.compiled, self.compile_s = batches, {}, 0.0
    for b in batches:
      if self.shape(b) not in self.compiled:
        t0 = time.perf_counter()
        self.compiled[self.shape(b)] = step.lower(self.state, b).compile()
        self.compile_s += time.perf_counter() - t0
    self.ran, self.times, self.loss = [], [], None

  @staticmethod
  def shape(b):
    return tuple((k, v.shape) for k, v in b.items())

  def step(self, i: int) -> None:
    """Runs batch i (cycling) and times it."""
    import jax

    b = self.batches[i % len(self.batches)]
    t0 = time.perf_counter()
    self.state, metrics = self.compiled[self.shape(b)](self.state, b)
    jax.block_until_ready(metrics)
    self.times.append(time.perf_counter() - t0)
    self.ran.append(b)
    self.loss = float(metrics["loss"])

  def report(self) -> dict:
    real = sum(int(b["attention_mask"].sum()) for b in self.ran)
    slots = sum(b["input_ids"].size for b in self.ran)
    seconds = sum(self.times)
    targets = sum(int((b["target_positions"] >= 0).sum()) for b in self.ran)
    every = sum(int(b["attention_mask"].sum()) for b in self.batches) / sum(b["input_ids"].size for b in self.batches)
    return {"batches": len(self.batches), "fill_all_batches": round(every, 3), "steps_timed": len(self.ran),
            "shapes": len(self.compiled),
            "compile_s": round(self.compile_s, 1), "seconds": round(seconds, 2),
            "s_per_step": round(seconds / len(self.ran), 3), "real_tokens": real, "token_slots": slots,
            "fill": round(real / slots, 3), "real_tokens_per_s": round(real / seconds, 1),
            "target_tokens_per_s": round(targets / seconds, 1), "last_loss": round(self.loss, 4)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--widths", default="256,512", help="LLM widths, one model each")
  parser.add_argument("--samples", type=int, default=96)
  parser.add_argument("--batch", type=int, default=4, help="rows per step, in every mode")
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--rounds", type=int, default=12, help="timed steps of each way, taken in turns")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args()

  from llasm_jax.config import llasm_config, load_config_file

  results = {"what": __doc__.split("\n")[0], "machine": machine(), "samples": args.samples, "batch": args.batch,
             "seq_len": args.seq_len, "audio": "tiny Whisper (2 x 64), encoder mode, stack 4", "widths": {}}
  for width in map(int, args.widths.split(",")):
    config = load_config_file(os.path.join(ROOT, "configs", "tiny.py") + ":stage2")
    config.model = {"preset": "tiny_encoder", "llm": llm(width)}
    cfg = llasm_config(config.model)
    samples = make_samples(cfg, args.samples, args.seq_len)
    lengths = [len(s["input_ids"]) for s in samples]
    row = {"llm": llm(width), "lengths": {"median": int(np.median(lengths)), "mean": round(float(np.mean(lengths)), 1),
                                          "max": int(np.max(lengths))}, "ways": {}}
    # Each way drops its last partial batch; packed rows take the samples in fewer batches, which
    # repeat. The ways take turns step by step, so that the other load on the machine (which
    # varies) slows each of them alike.
    ways = {how: Way(cfg, config, make_batches(cfg, samples, how, args.batch, args.seq_len))
            for how in ("padded", "buckets", "packed")}
    for way in ways.values():  # one untimed step each: first-run allocations out of the numbers
      way.step(0)
      way.ran, way.times = [], []
    row["load_before"] = load()
    for i in range(args.rounds):
      for way in ways.values():
        way.step(i)
    row["load_after"] = load()
    for how, way in ways.items():
      row["ways"][how] = way.report()
      print(f"width {width}", how, json.dumps(row["ways"][how]), flush=True)
    tps = {how: w["real_tokens_per_s"] for how, w in row["ways"].items()}
    row["speedup_vs_padded"] = round(tps["packed"] / tps["padded"], 2)
    row["speedup_vs_buckets"] = round(tps["packed"] / tps["buckets"], 2)
    results["widths"][str(width)] = row
  print(json.dumps(results, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
