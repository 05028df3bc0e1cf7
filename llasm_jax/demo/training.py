"""The demo's training phases: each phase's run config, this machine's speed, the schedule sized to the
time budget, and the runs."""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from typing import Any

from llasm_jax.demo.common import SYSTEM, TEMPLATE, Options, log
from llasm_jax.demo.data import train_sets
from llasm_jax.errors import UserError


def phase_config(opts: Options, model: str, caches: dict[str, str], work: str, phase: str):
  """The stage-1 run config of a training phase (the LLM's weights frozen), before its schedule is
  sized: "warm" is CTC alone on the adaptor (no LLM pass); "train" is the CE (or KD) loss with CTC as
  an auxiliary, on the adaptor and `--lora-rank` LoRA factors."""
  from llasm_jax.train.sections import from_model_folder

  config = from_model_folder(1, model)
  warm = phase == "warm"
  config.train.update(batch_size=opts.ctc_batch if warm else opts.batch, log_every=10, checkpoint_every=100,
                      loss="ctc" if warm else opts.loss, ctc_weight=opts.ctc_weight if uses_ctc(opts) and not warm else 0.0,
                      ctc_negatives=opts.ctc_negatives, seed=opts.seed,
                      compilation_cache=os.path.join(work, "compilation_cache"))
  config.optim.update(lr=opts.ctc_lr if warm else opts.lr)
  config.model.soft_tokens = opts.soft_tokens and not warm and opts.ctc_share > 0 and uses_ctc(opts)
  if not warm:
    config.train.lora.rank = opts.lora_rank
  # Few shapes, so that a short run does not spend its time compiling: CTC alone reads no text, so
  # one length; the LLM's rows in steps of 32 tokens.
  config.data.update(source="tfds", dir=",".join(caches[n] for n in train_sets(caches)), template=TEMPLATE,
                     system=SYSTEM, seq_len=256, buckets=(256,) if warm else tuple(range(64, 257, 32)),
                     max_audios=1, workers=-1, shared_prefix=True)
  return config


def sized(config, plan: dict[str, Any]):
  """`config` with a complete schedule of `plan["steps"]` (warmup a tenth, at most 50) and a stop at
  1.5x the time those steps take at the measured speed, so that a machine that slows down mid-run
  still ends it."""
  config = copy.deepcopy(config)
  steps = plan["steps"]
  config.train.update(steps=steps, max_minutes=1.5 * max(plan["seconds"], steps * plan["s_per_step"]) / 60)
  config.optim.update(warmup_steps=min(50, steps // 10))
  return config


def measure_speed(config, folder: str, steps: int = 10) -> tuple[float, float]:
  """This machine's (seconds per step, seconds of fixed cost) of `config`'s training, from a short run
  in `folder`, deleted after. The fixed cost is the run's wall time less its steps (loading, the data
  pipeline's start, compiling): the real run pays about as much again (it reads the compilation
  cache the probe filled, but saves checkpoints and the model), so the schedule leaves it room."""
  from llasm_jax.train import trainer

  probe = copy.deepcopy(config)
  probe.train.update(steps=steps, log_every=max(1, steps // 5), checkpoint_every=10 ** 6, max_minutes=0.0)
  start = time.perf_counter()
  try:
    history = trainer.train(probe, folder)["history"]
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  wall = time.perf_counter() - start
  # The first interval holds the data pipeline's start; the mean of the others counts a new
  # shape's compile as the real run will meet it.
  steady = history[1:] or history
  s = sum(h["s_per_step"] for h in steady) / len(steady)
  return s, max(0.0, wall - steps * s)


def uses_ctc(opts: Options) -> bool:
  """Whether the adaptor trains with CTC (warm phase, auxiliary loss): not in "decoder" mode, whose
  adaptor reads Whisper's own transcript."""
  return opts.mode != "decoder"


def phase_shares(opts: Options) -> dict[str, float]:
  if not 0 <= opts.ctc_share < 1:
    raise UserError(f"--ctc-share {opts.ctc_share}: expected a share of the budget in [0, 1)")
  if not uses_ctc(opts):
    return {"train": 1.0}
  return {k: v for k, v in (("warm", opts.ctc_share), ("train", 1 - opts.ctc_share)) if v > 0}


def schedule(opts: Options, model: str, caches: dict[str, str], work: str) -> dict[str, Any]:
  """Each phase's steps, sized to its share of the budget at the speed measured here."""
  out = {}
  for phase, share in phase_shares(opts).items():
    config = phase_config(opts, model, caches, work, phase)
    s, fixed = measure_speed(config, os.path.join(work, f"probe_{phase}"))
    seconds = 60 * opts.minutes * share
    steps = max(20, int((seconds - fixed) / s))
    batch = config.train.batch_size
    out[phase] = {"seconds": seconds, "s_per_step": s, "fixed_s": fixed, "steps": steps, "batch": batch,
                  "samples": steps * batch}
    log(f"  {phase}: {s:.3f} s per step of {batch} here, {fixed:.0f} s to start -> {steps} steps "
        f"({steps * batch} samples) in {seconds / 60:.1f} min")
  return out


def run_phase(config, folder: str, batch: int) -> dict[str, Any]:
  from llasm_jax.train import trainer
  from llasm_jax.train.metrics import read_metrics

  summary = trainer.train(config, folder)
  if summary["stop_reason"] not in ("finished", "time budget"):
    raise SystemExit(f"training stopped: {summary['stop_reason']}; run the demo again to resume")
  history = read_metrics(folder)
  return {"model": os.path.join(folder, "model"), "steps": summary["step"], "planned_steps": config.train.steps,
          "stop_reason": summary["stop_reason"], "samples": summary["step"] * batch,
          "samples_per_s": samples_per_s(history, batch), "first_loss": history[0]["loss"],
          "final_loss": history[-1]["loss"], "history": [{k: h[k] for k in ("step", "loss") if k in h}
                                                          for h in history]}


def samples_per_s(history: list[dict[str, Any]], batch: int) -> float:
  steady = history[1:] or history  # the first interval holds the first batches' waits
  return batch / (sum(h["s_per_step"] for h in steady) / len(steady)) if steady else math.nan
