"""The training loop: sharded init or restore, the jitted step per batch shape, and what a run reports and keeps.

`llasm-jax train --config configs/<file>.py --workdir DIR [--config.key=value ...]` calls
`train(config, workdir)`. Every process runs this same program on its own data shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llasm_jax import checkpoint, compilation_cache, paths
from llasm_jax.data import global_batch, pipeline
from llasm_jax.data.contract import batch_spec
from llasm_jax.errors import UserError
from llasm_jax.train.checkpoints import Checkpoints, save_model
from llasm_jax.train.evaluation import make_evaluator, run_eval
from llasm_jax.train.data_config import pipeline_config
from llasm_jax.train.metrics import Metrics, log, model_flops_per_step
from llasm_jax.train.optim import FROZEN, learning_rate
from llasm_jax.train.preemption import Preemption
from llasm_jax.train.setup import Setup, check_cached_features, initial_params, make_data, prepare, trains_llm
from llasm_jax.train.step import TrainState


def git_revision() -> str:
  """The checkout's commit (run.json records it), or "unknown" outside a git checkout."""
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def abstract_batch(config, setup: Setup) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch (the largest buckets: `contract.batch_spec`), with their shardings."""
  pcfg = pipeline_config(config, setup.cfg, setup.features)
  prefix_len = 0
  if pcfg.shared_prefix:  # P: the template's fixed opening in the run's tokenizer
    tokenizer = config.data.get("tokenizer") or config.train.get("init_from")
    if not tokenizer:
      raise UserError("config.data.shared_prefix: the shared prefix is the template's opening in the run's "
                       "tokens; set config.data.tokenizer or config.train.init_from (a model folder)")
    prefix_len = len(pipeline.Featurize(pcfg, tokenizer, "asr").template.fixed_prefix())
  spec = batch_spec(pcfg, config.train.batch_size, feature_dim=setup.cfg.feature_dim,
                    feature_dtype=setup.cache["dtype"] if setup.cache else "float32", prefix_len=prefix_len)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=setup.batch_sharding[k]) for k, (s, d) in spec.items()}


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
  setup = prepare(config)
  cfg, mesh, rules, tc = setup.cfg, setup.mesh, setup.rules, config.train
  # Whatever stops the run, an error included, closes what it opened: the checkpoint manager
  # (its async saves), the data iterator (grain's workers), the metric writers, the SIGTERM handler.
  with contextlib.ExitStack() as opened:
    ckpts = opened.enter_context(contextlib.closing(Checkpoints(workdir, config)))
    start = ckpts.latest_step()
    record_run(config, workdir, setup, resuming=start is not None)
    data, _ = make_data(config, cfg)
    if hasattr(data, "close"):
      opened.callback(data.close)  # stops the grain worker processes
    state, start = start_state(config, setup, ckpts, data, start)
    trainable_llm = trains_llm(setup)
    if setup.features == "cached":
      check_cached_features(config, setup, state)
    metrics_out = opened.enter_context(contextlib.closing(Metrics(
        workdir, config, tc.steps, start,
        lambda t: model_flops_per_step(cfg, config, trainable_llm, whisper=setup.features == "mel", seq_len=t))))
    lr = learning_rate(config.optim, tc.steps)
    preempt = Preemption()
    opened.callback(preempt.restore_handlers)
    compiled = {}  # one executable per batch shape (length / feature buckets)
    fixed_shapes = getattr(data, "fixed_shapes", True)
    last_metrics = None
    stop_reason = "finished"
    budget_s = 60 * float(tc.get("max_minutes", 0.0))
    evals: list[dict] = []
    evaluator = make_evaluator(config, setup)
    for step in range(start, tc.steps):
      host = next(data)
      batch = global_batch.to_global(host, mesh, rules, same_shape=fixed_shapes)
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


def record_run(config: ml_collections.ConfigDict, workdir: str, setup: Setup, *, resuming: bool) -> None:
  """Writes WORKDIR/config.json and run.json (revision, model, mesh, what trains) and logs the
  model; a resumed run must train what its checkpoints' run trained (the optimizer state's shape)."""
  cfg, mesh, tc = setup.cfg, setup.mesh, config.train
  run_file = paths.resolve(workdir) / "run.json"
  before = json.loads(run_file.read_text()) if run_file.exists() else {}
  # What shapes the optimizer state, as JSON holds it (lists, not tuples), to compare with a resumed run's.
  trained = json.loads(json.dumps({"trainable": list(tc.trainable), "lora": dataclasses.asdict(cfg.llm.lora)}))
  if resuming and before.get("trained", trained) != trained:
    raise UserError(f"{workdir} holds checkpoints of a run that trained {before['trained']}, and this config trains "
                     f"{trained}: the optimizer state does not match; resume with the same config.train.trainable "
                     "and lora, or pass another --workdir")
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    paths.write_json(run_file, {
        "git_revision": git_revision(), "model": checkpoint.config_to_dict(cfg), "processes": jax.process_count(),
        "devices": jax.device_count(), "mesh": dict(mesh.shape),
        "compilation_cache": jax.config.jax_compilation_cache_dir, "trained": trained})
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


def start_state(config: ml_collections.ConfigDict, setup: Setup, ckpts: Checkpoints, data,
                start: int | None) -> tuple[TrainState, int]:
  """(state, step): checkpoint `start`'s, the data iterator moved to where it was; else (start
  None) the initial parameters and a fresh optimizer state at step 0."""
  if start is not None:
    state, data_state = ckpts.restore(start, setup.abstract_state)
    data.set_state(data_state)
    log(f"resumed from step {start} ({ckpts.dir})")
    return state, start
  sh, replicated = setup.state_sharding, setup.replicated
  params, rest = initial_params(config, setup.cfg, setup.mesh, setup.rules, sh.params, sh.rest)
  with jax.set_mesh(setup.mesh):
    opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(params)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params, rest=rest,
                     opt_state=opt_state, rng=jax.device_put(jax.random.key_data(jax.random.key(config.train.seed)),
                                                             replicated))
  return state, 0
