"""The training loop: mesh, sharded init or restore, the jitted step, checkpoints, logs, preemption.

`llasm-jax train --config configs/<file>.py --workdir DIR [--config.key=value ...]` calls
`train(config, workdir)`. Every process runs this same program on its own data shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from tqdm import tqdm

from llasm_jax import checkpoint, compilation_cache, paths, sharding
from llasm_jax.config import ctc_weight, llasm_config, loss_options, needs_ctc, needs_teacher
from llasm_jax.data import encode, pipeline
from llasm_jax.models.llasm import CtcBlank, Llasm, LlasmConfig
from llasm_jax.layers.lora import is_lora_path
from llasm_jax.train.optim import (FROZEN, learning_rate, lora_config, lora_labels, make_optimizer, param_labels,
                                   path_str)
from llasm_jax.train.step import TrainState, make_train_step
from llasm_jax.errors import UserError


def log(*args) -> None:
  if jax.process_index() == 0:
    tqdm.write(" ".join(str(a) for a in args))


def git_revision() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


# ---------------------------------------------------------------------------------------------
# Model config and initial parameters


RUN_OPTIONS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl", "vocab_multiple")


def model_config(config: ml_collections.ConfigDict) -> LlasmConfig:
  """From `config.model`, or from the model folder / stage-1 workdir in `config.train.init_from`
  (its architecture wins; `config.model.llm`/`audio` still set run options such as dtype), with
  the LLM's LoRA from `config.train.lora`, and the CTC blank when config.train trains with CTC
  (a folder without one gets a fresh one: `initial_params`)."""
  init_from = config.train.get("init_from")
  lora = lora_config(config.train)
  if not init_from:
    cfg = llasm_config(config.model)
    return cfg.replace(llm=cfg.llm.replace(lora=lora), ctc=cfg.ctc or needs_ctc(config) or cfg.soft_tokens)
  meta = checkpoint.read_meta(init_from)
  if meta["kind"] != "llasm":
    raise UserError(f"config.train.init_from {init_from!r} holds a {meta['kind']!r} model; training needs a "
                     "LLaSM model: `llasm-jax convert --llm LLM --whisper WHISPER --out DIR`")
  cfg = checkpoint.config_from_dict("llasm", meta["config"])

  def run_options(part: str) -> dict:
    return {k: v for k, v in config.model.get(part, {}).items() if k in RUN_OPTIONS}

  # config.model.soft_tokens turns LegoSLM's input on for a folder trained without it (a CTC warm phase).
  soft = cfg.soft_tokens or bool(config.model.get("soft_tokens", False))
  return cfg.replace(llm=cfg.llm.replace(lora=lora, **run_options("llm")),
                     audio=cfg.audio.replace(**run_options("audio")), ctc=cfg.ctc or needs_ctc(config) or soft,
                     soft_tokens=soft)


def initial_params(config, cfg: LlasmConfig, mesh, rules, param_sharding, rest_sharding):
  """(params, rest) as global arrays in their shardings: random, or from `init_from`."""
  init_from = config.train.get("init_from")
  if not init_from:
    def init():
      _, params, rest = nnx.split(Llasm(cfg, rngs=nnx.Rngs(config.train.seed)), nnx.Param, ...)
      return params, rest

    with jax.set_mesh(mesh):
      return jax.jit(init, out_shardings=(param_sharding, rest_sharding))()
  # New LoRA factors (a base model adapted in stage 2) start as the random init above would.
  stored = checkpoint.read_meta(init_from)["config"]
  stored_ctc, stored_soft = bool(stored.get("ctc", False)), bool(stored.get("soft_tokens", False))
  model, _ = checkpoint.load_model(init_from, mesh=mesh, rules=rules, seed=config.train.seed,
                                   cfg=cfg.replace(ctc=cfg.ctc and stored_ctc, soft_tokens=cfg.soft_tokens and stored_soft))
  if cfg.ctc and not stored_ctc:  # CTC on a folder without the blank (e.g. a fresh `convert`): a new one
    model.ctc_blank = CtcBlank(cfg.llm.hidden_size, cfg.llm.vocab_size, param_dtype=cfg.llm.param_dtype,
                               soft_tokens=cfg.soft_tokens)
    log(f"added a new CTC blank (ctc_blank/) to the model of {init_from}")
  elif cfg.soft_tokens and not stored_soft:  # LegoSLM's input on a CTC-trained folder: the blank's embedding
    model.ctc_blank.add_embedding()
    log(f"added a blank embedding (ctc_blank/embedding) to the model of {init_from}: the LLM reads soft tokens")
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, param_sharding)
  log(f"initialised from {init_from}")
  return params, rest


# ---------------------------------------------------------------------------------------------
# Data


def make_data(config, cfg: LlasmConfig):
  """The host's data iterator (grain, with get_state/set_state) and the per-host batch size."""
  global_batch = config.train.batch_size
  if global_batch % jax.process_count():
    raise UserError(f"config.train.batch_size {global_batch} does not divide over {jax.process_count()} processes")
  host_batch = global_batch // jax.process_count()
  source = config.data.source
  if source == "synthetic" and config.data.get("packing"):
    raise UserError("config.data.packing packs the samples of config.data.source='tfds'; the synthetic batches "
                     "come as whole rows: set config.data.packing=False")
  if source == "synthetic" and needs_ctc(config):
    raise UserError("config.train CTC (loss 'ctc' or ctc_weight > 0) aligns the audio to its transcript, which "
                     "synthetic batches lack: set config.data.source='tfds' with built datasets")
  if source == "synthetic":
    from llasm_jax.train.synthetic import synthetic_dataset

    ds = synthetic_dataset(cfg, config.data, seed=config.data.seed, host_batch=host_batch,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           teacher=needs_teacher(config))
    return iter(ds), host_batch
  return pipeline.train_iterator(config, cfg, host_batch=host_batch), host_batch


def check_cached_features(config, setup: "Setup", state: TrainState) -> None:
  """Cached features must be what this model's own Whisper would compute: same mode, sizes,
  windows (checked when the data opened) and the same Whisper weights (checked here)."""
  params = nnx.to_pure_dict(nnx.merge_state(state.params, state.rest))
  pipeline.check_cache(setup.cache, setup.cfg, mel_frames=config.data.get("mel_frames", 3000),
                       whisper_fingerprint=encode.speech_fingerprint(params),
                       where=f"config.data.dir {config.data.dir!r}")


# ---------------------------------------------------------------------------------------------
# Checkpoints: params (a model-folder tree), optimizer state, step/rng, data iterator state


class Checkpoints:
  """Orbax CheckpointManager over `workdir/checkpoints`: async, atomic, keeps the last K."""

  def __init__(self, workdir: str, config):
    self.dir = paths.join(workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.dir, item_names=("params", "opt_state", "train", "data"),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=config.train.checkpoint_every, max_to_keep=config.train.keep_checkpoints,
            enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
    """`step` is the host's count (reading `state.step` would wait for the device)."""
    if force and step in self.manager.all_steps():
      return False  # the interval save already took this step
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.merge_state(state.params, state.rest))),
        opt_state=ocp.args.StandardSave(jax.tree.leaves(state.opt_state)),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    full = nnx.merge_state(abstract.params, abstract.rest)
    as_target = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    opt_leaves, opt_def = jax.tree.flatten(abstract.opt_state)
    got = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(as_target(nnx.to_pure_dict(full))),
        opt_state=ocp.args.StandardRestore(as_target(opt_leaves)),
        train=ocp.args.StandardRestore(as_target({"step": abstract.step, "rng": abstract.rng})),
        data=ocp.args.JsonRestore()))
    merged = nnx.merge_state(abstract.params, abstract.rest)
    nnx.replace_by_pure_dict(merged, got.params)
    new_params, new_rest = nnx.split_state(merged, nnx.Param, ...)
    state = TrainState(step=got.train["step"], params=new_params, rest=new_rest,
                       opt_state=jax.tree.unflatten(opt_def, list(got.opt_state)), rng=got.train["rng"])
    return state, got.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


# ---------------------------------------------------------------------------------------------
# Observability


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


# ---------------------------------------------------------------------------------------------
# Preemption


class Preemption:
  """SIGTERM (preemption, scancel, `launch/tpu.sh stop`) asks for a save at the current step.

  One process: a Python handler sets a flag, read after every step. Several processes: JAX's
  preemption sync manager (started by jax.distributed.initialize) catches the signal on any
  host, tells the others, and they agree on the next step to save at; asking it after every step
  costs no collective until a notice arrives, so a short grace period still saves whatever the
  logging interval. Without it (a distributed runtime that lacks one) the hosts compare flags
  with one tiny all-gather at logging intervals.
  """

  def __init__(self):
    self.requested = False
    self.synced = jax.process_count() > 1
    # With several processes the sync manager's own handler must see the signal: keep Python's out.
    self._old = {} if self.synced else {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,)}

  def _handle(self, signum, frame):
    self.requested = True

  def check(self, step: int, at_interval: bool) -> bool:
    """Whether to save `step` and stop; all processes get the same answer at the same step."""
    if jax.process_count() == 1:
      return self.requested
    if self.synced:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption sync manager in this runtime
        self.synced = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,)}
    if not at_interval:
      return False
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.max(flags))

  def restore_handlers(self) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Setup:
  """Everything about a run that follows from its config alone (nothing allocated)."""

  cfg: LlasmConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: Any
  labels: Any
  tx: optax.GradientTransformation
  state_sharding: TrainState
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  batch_sharding: dict[str, jax.sharding.NamedSharding]
  step: Any  # the jitted train step
  features: str = "mel"  # the batches' audio: "mel", or "cached" Whisper outputs (no Whisper in the step)
  cache: dict | None = None  # the cached dataset's marker (what made its features)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def compile(self, batch):
    # The rules and mesh must be active while tracing: `constrain` reads them then.
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      return self.step.lower(self.abstract_state, batch).compile()


def prepare(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """`devices`: the mesh's devices, default all of this job's (a TPU topology's for `--compile-only`)."""
  cfg = model_config(config)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  tc = config.train
  if tc.batch_size % (tc.grad_accum * mesh.shape["data"] * mesh.shape["fsdp"]):
    raise UserError(f"config.train.batch_size {tc.batch_size} must divide by grad_accum ({tc.grad_accum}) x "
                     f"data x fsdp ({mesh.shape['data'] * mesh.shape['fsdp']})")
  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(lambda: Llasm(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
  # The CTC blank trains whenever CTC does (it is part of the CTC loss, not of the model's answers).
  labels = param_labels(abs_params, tuple(tc.trainable) + (("ctc_blank/.*",) if needs_ctc(config) or cfg.soft_tokens
                                                           else ()))
  if cfg.llm.lora.rank:
    labels = lora_labels(labels)
  tx = make_optimizer(config.optim, labels, tc.steps)
  param_sh = sharding.state_shardings(abs_params, mesh, rules)
  rest_sh = sharding.state_shardings(abs_rest, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abs_opt = jax.eval_shape(tx.init, abs_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
  state_sh = TrainState(step=replicated, params=param_sh, rest=rest_sh, opt_state=opt_sh, rng=replicated)
  abs_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params, rest=abs_rest,
                         opt_state=abs_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  # The shardings tree is a prefix of the state (optax's MaskedNode subtrees hold no arrays).
  abs_state = jax.tree.map(
      lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub),
      state_sh, abs_state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  first_new_row = None
  if tc.get("new_token_rows_only"):
    first_new_row = min(cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id)
  loss, kd_weight, kd_temperature = loss_options(tc)
  step_fn = make_train_step(graphdef, tx, labels, grad_accum=tc.grad_accum, first_new_row=first_new_row,
                            loss=loss, kd_weight=kd_weight, kd_temperature=kd_temperature,
                            loss_chunk=int(tc.get("loss_chunk", 0)), ctc_weight=ctc_weight(tc),
                            ctc_negatives=int(tc.get("ctc_negatives", 0)))
  features, cache = pipeline.data_features(config)
  batch_sh = {k: jax.sharding.NamedSharding(mesh, sharding.logical_spec(pipeline.BATCH_AXES[k], rules))
              for k in pipeline.batch_keys(features, teacher=needs_teacher(config),
                                           prefix=bool(config.data.get("shared_prefix", False)),
                                           packed=bool(config.data.get("packing", False)), ctc=needs_ctc(config))}
  jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))
  return Setup(cfg, mesh, rules, graphdef, labels, tx, state_sh, abs_state, batch_sh, jitted, features, cache)


def trains_llm(setup: Setup) -> bool:
  """Whether any LLM weight trains (stage 2): its weight gradients count in the step's FLOPs.
  LoRA factors do not count: with them alone no gradient of the LLM's matrices is computed, and
  theirs (rank r) cost next to nothing."""
  return any(lab != FROZEN for lab, (path, _) in zip(jax.tree.leaves(setup.labels),
                                                      jax.tree_util.tree_leaves_with_path(setup.abstract_state.params))
             if path_str(path).startswith("llm/") and not is_lora_path(path_str(path)))


def abstract_batch(config, setup: Setup) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch (the largest buckets), with their shardings."""
  cfg, data = setup.cfg, config.data
  b, t, a = config.train.batch_size, data.seq_len, data.max_audios
  frames = 3000 if cfg.padded_mel else data.mel_frames
  shapes = {"input_ids": ((b, t), jnp.int32), "labels": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.int32),
            "positions": ((b, t), jnp.int32), "target_positions": ((b, t), jnp.int32)}
  if setup.features == "cached":
    s = pipeline.pipeline_config(config, cfg, "cached").feature_frames
    shapes["audio_features"] = ((b, a, s, cfg.feature_dim), jnp.dtype(setup.cache["dtype"]))
    shapes["audio_feature_lengths"] = ((b, a), jnp.int32)
  else:
    shapes["mel"] = ((b, a, cfg.audio.num_mel_bins, frames), jnp.float32)
    shapes["mel_lengths"] = ((b, a), jnp.int32)
  if needs_teacher(config):
    shapes.update({k: ((b, t), jnp.int32) for k in pipeline.TEACHER_KEYS})
  if data.get("shared_prefix"):
    shapes["prefix_ids"] = ((64,), jnp.int32)  # a long system prompt's opening; the rows keep all of T
  if data.get("packing"):
    shapes["segment_ids"] = ((b, t), jnp.int32)
  if needs_ctc(config):
    shapes["ctc_labels"] = ((b, pipeline.pipeline_config(config, cfg, setup.features).ctc_width), jnp.int32)
    shapes["ctc_label_lengths"] = ((b,), jnp.int32)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=setup.batch_sharding[k]) for k, (s, d) in shapes.items()}


def compile_only(config: ml_collections.ConfigDict, devices=None, *, quiet: bool = False) -> dict[str, Any]:
  """Compiles the train step for the config's mesh without allocating the model: per-device
  memory and the step's model FLOPs before a job reaches the hardware. `devices`: the mesh's,
  default this job's (run with the target's device count, e.g.
  XLA_FLAGS=--xla_force_host_platform_device_count=N on a CPU host), or a TPU topology's
  compile-only devices (llasm_jax/train/plan.py), whose compiler applies the chip's HBM limit:
  a step over it leaves the compiler's RESOURCE_EXHAUSTED line under "out_of_memory"."""
  setup = prepare(config, devices)
  trainable_llm = trains_llm(setup)
  out = {"devices": setup.mesh.size, "mesh": dict(setup.mesh.shape),
         "model_flops_per_step": model_flops_per_step(setup.cfg, config, trainable_llm,
                                                      whisper=setup.features == "mel")}
  t0 = time.perf_counter()
  try:
    compiled = setup.compile(abstract_batch(config, setup))
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, out["out_of_memory"] = None, str(e).strip().splitlines()[0]
  out["compile_s"] = round(time.perf_counter() - t0, 1)
  mem = compiled.memory_analysis() if compiled is not None else None
  if mem is not None:
    # Every field in bytes; "peak_memory_in_bytes" counts the buffers live at once (donated
    # arguments reused by their outputs), the other fields each kind of buffer on its own.
    out["memory_bytes"] = {k: int(getattr(mem, k)) for k in dir(mem) if k.endswith("_in_bytes")}
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes"):
      out[k.replace("_in_bytes", "_gib")] = round(getattr(mem, k, 0) / 2**30, 3)
  if not quiet:
    log(json.dumps(out, indent=1))
  return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains until `config.train.steps`, resuming from the latest checkpoint in `workdir` (a local
  folder or a bucket, gs://BUCKET/run), with JAX's compilation cache in the workdir (or
  `config.train.compilation_cache`)."""
  workdir = paths.join(workdir)
  with compilation_cache.using(config.train.get("compilation_cache") or paths.join(workdir, "compilation_cache")):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  cache = jax.config.jax_compilation_cache_dir
  setup = prepare(config)
  cfg, mesh, rules, tc = setup.cfg, setup.mesh, setup.rules, config.train
  replicated = setup.replicated
  run_file = paths.resolve(workdir) / "run.json"
  before = json.loads(run_file.read_text()) if run_file.exists() else {}
  # What shapes the optimizer state, as JSON holds it (lists, not tuples), to compare with a resumed run's.
  trained = json.loads(json.dumps({"trainable": list(tc.trainable), "lora": dataclasses.asdict(cfg.llm.lora)}))
  ckpts = Checkpoints(workdir, config)
  start = ckpts.latest_step()
  if start is not None and before.get("trained", trained) != trained:
    ckpts.close()
    raise UserError(f"{workdir} holds checkpoints of a run that trained {before['trained']}, and this config trains "
                     f"{trained}: the optimizer state does not match; resume with the same config.train.trainable "
                     "and lora, or pass another --workdir")
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    paths.write_json(run_file, {
        "git_revision": git_revision(), "model": checkpoint.config_to_dict(cfg), "processes": jax.process_count(),
        "devices": jax.device_count(), "mesh": dict(mesh.shape), "compilation_cache": cache, "trained": trained})
  log(f"model: mode {cfg.mode!r}, LLM {cfg.llm.num_hidden_layers}x{cfg.llm.hidden_size}, compute {cfg.llm.dtype}; "
      f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} processes")
  abs_params, labels = setup.abstract_state.params, setup.labels
  n_train = sum(int(np.prod(x.shape)) for x, lab in zip(jax.tree.leaves(abs_params), jax.tree.leaves(labels))
                if lab != FROZEN)
  n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_params))
  what = ", ".join(tc.trainable)
  if cfg.llm.lora.rank:
    what = f"of the LLM only LoRA rank {cfg.llm.lora.rank} on {', '.join(cfg.llm.lora.targets)}; {what}"
  log(f"parameters: {n_all:,}, trainable {n_train:,} ({what})")

  data, host_batch = make_data(config, cfg)
  if start is not None:
    state, data_state = ckpts.restore(start, setup.abstract_state)
    data.set_state(data_state)
    log(f"resumed from step {start} ({ckpts.dir})")
  else:
    sh = setup.state_sharding
    params, rest = initial_params(config, cfg, mesh, rules, sh.params, sh.rest)
    with jax.set_mesh(mesh):
      opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(params)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params, rest=rest,
                       opt_state=opt_state, rng=jax.device_put(jax.random.key_data(jax.random.key(tc.seed)),
                                                               replicated))
    start = 0

  trainable_llm = trains_llm(setup)
  if setup.features == "cached":
    try:
      check_cached_features(config, setup, state)
    except ValueError:
      ckpts.close()
      data.close()
      raise
  metrics_out = Metrics(workdir, config, tc.steps, start, lambda t: model_flops_per_step(
      cfg, config, trainable_llm, whisper=setup.features == "mel", seq_len=t))
  lr = learning_rate(config.optim, tc.steps)
  preempt = Preemption()
  compiled = {}  # one executable per batch shape (length / feature buckets)
  fixed_shapes = getattr(data, "fixed_shapes", True)
  last_metrics = None
  stop_reason = "finished"
  budget_s = 60 * float(tc.get("max_minutes", 0.0))
  evals: list[dict] = []
  try:
    evaluator = make_evaluator(config, setup)
    for step in range(start, tc.steps):
      host = next(data)
      batch = pipeline.to_global(host, mesh, rules, same_shape=fixed_shapes)
      shapes = tuple((k, v.shape) for k, v in batch.items())
      if shapes not in compiled:
        t0 = time.perf_counter()
        compiled[shapes] = setup.compile(batch)
        seconds = time.perf_counter() - t0
        metrics_out.t0 += seconds  # compiling is not training time
        log(f"compiled the train step in {seconds:.1f} s" + (
            "" if len(compiled) == 1 else f" (shape {len(compiled)}: {dict((k, list(s)) for k, s in shapes)})"))
      state, last_metrics = compiled[shapes](state, batch)
      tokens = int(np.sum(host["attention_mask"])) * jax.process_count()
      length = host["input_ids"].shape[1] + len(host.get("prefix_ids", ()))  # a shared prefix counts in full
      metrics_out.step(step + 1, last_metrics, tokens, lr, length)
      if tc.get("debug_sigterm_at_step") == step + 1:
        os.kill(os.getpid(), signal.SIGTERM)  # tests: a real signal through the real handler
      ckpts.save(step + 1, state, data.get_state())
      if evaluator is not None and evaluator.due(step + 1):
        evals.append(run_eval(evaluator, setup, state, step + 1, metrics_out, workdir))
      # Reading device values waits for the step: only at logging intervals, so that the
      # host runs ahead (next batch, next dispatch) the rest of the time.
      at_interval = (step + 1) % tc.log_every == 0 or step + 1 == tc.steps
      if at_interval and int(last_metrics["nonfinite_steps"]) > tc.max_nonfinite_steps:
        stop_reason = (f"stopped: {int(last_metrics['nonfinite_steps'])} steps had non-finite loss or gradients "
                       f"(limit config.train.max_nonfinite_steps={tc.max_nonfinite_steps}); lower the learning rate "
                       "or check the data")
        break
      if preempt.check(step + 1, at_interval):
        ckpts.save(step + 1, state, data.get_state(), force=True)
        stop_reason = f"preempted: saved step {step + 1}, resume with the same command"
        break
      if budget_s and at_interval and metrics_out.trained >= budget_s:
        ckpts.save(step + 1, state, data.get_state(), force=True)
        stop_reason = "time budget"
        log(f"time budget of {tc.max_minutes:g} min reached at step {step + 1} of {tc.steps}")
        break
    else:
      ckpts.save(int(state.step), state, data.get_state(), force=True)
      if evaluator is not None and not (evals and evals[-1]["step"] == int(state.step)):
        evals.append(run_eval(evaluator, setup, state, int(state.step), metrics_out, workdir))
    ckpts.wait()
  finally:
    preempt.restore_handlers()
    metrics_out.close()
    ckpts.close()
    if hasattr(data, "close"):
      data.close()  # stops the grain worker processes
  log(stop_reason)
  if stop_reason in ("finished", "time budget"):
    save_model(paths.join(workdir, "model"), cfg, state, config)
  summary = dict(stop_reason=stop_reason, step=int(state.step), history=metrics_out.history, eval=evals)
  line = f"summary: at step {summary['step']} of {tc.steps} ({summary['step'] - start} this run)"
  if last_metrics is not None:
    line += f", last loss {float(last_metrics['loss']):.4f}"
  if metrics_out.history:
    line += f", {metrics_out.history[-1]['tokens_per_s']:,.0f} tok/s"
  log(line + f"; checkpoints in {ckpts.dir}")
  return summary


# ---------------------------------------------------------------------------------------------
# Evaluation during training (config.eval)


def make_evaluator(config, setup: Setup):
  """The `config.eval` evaluator (llasm_jax/infer/evaluate.py), or None: `config.eval.every` 0 (default)."""
  ev = config.get("eval")
  if not ev or not ev.get("every"):
    return None
  from llasm_jax.infer.evaluate import TrainingEval

  return TrainingEval(config, setup.cfg, setup.mesh, setup.rules)


def run_eval(evaluator, setup: Setup, state: TrainState, step: int, metrics: Metrics, workdir: str) -> dict:
  """Greedy answers of the current parameters (the arrays of `state`, where they are), scored:
  one log line, TensorBoard eval/wer|cer|f1, and workdir/eval/step_<step>.json."""
  t0 = time.perf_counter()
  report = evaluator(nnx.merge(setup.graphdef, state.params, state.rest), step)
  log(f"eval step {step:>6} | {report.summary()}")
  if metrics.writer is not None:
    for k in ("wer", "cer", "f1"):
      if k in report.totals:
        metrics.writer.add_scalar(f"eval/{k}", report.totals[k], step)
    metrics.writer.flush()
  if jax.process_index() == 0:
    report.write(paths.join(workdir, "eval", f"step_{step}.json"))
  metrics.t0 += time.perf_counter() - t0  # evaluating is not training time
  return {"step": step, **report.totals}


def save_model(folder: str, cfg: LlasmConfig, state: TrainState, config) -> None:
  """The trained model as a model folder (what `generate` and `export` read)."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.merge_state(state.params, state.rest)), sep="/")
  # The prompt format the batches had (synthetic batches have none): generate / chat / eval default to it.
  extra = {} if config.data.get("source") != "tfds" else {checkpoint.PROMPT_KEY: {
      "template": config.data.get("template", "llasm-cllama2"), "system": config.data.get("system")}}
  with checkpoint.atomic_dir(folder, overwrite=True) as tmp:
    checkpoint.save_params(tmp, "llasm", cfg, flat, stored_dtype=cfg.llm.param_dtype, extra=extra)
    init_from = config.train.get("init_from")
    if init_from:
      checkpoint.copy_companions(init_from, tmp)
  log(f"model written to {folder}")
