"""Plans a run for a TPU slice from any host: libtpu compiles the real train step for the slice's
topology, then the per-chip HBM, fit, largest batch per remat policy and step-time estimates.

`llasm-jax train --config configs/<file>.py --compile-only --topology v5p:4x4x4 [--search]` calls
`plan(config, "v5p:4x4x4")` (or `search(...)`); nothing is allocated and no TPU is needed, only
libtpu (`pip install 'jax[tpu]'`), whose compiler applies the chip's real memory limit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import ml_collections

from llasm_jax import sharding
from llasm_jax.layers.stack import REMAT_POLICIES
from llasm_jax.train import trainer
from llasm_jax.train.setup import model_config
from llasm_jax.errors import UserError

# The step-time estimate's model FLOPs utilisation: well-tuned dense LLM training on TPU reaches
# 40-60 %; 40 % is a planning figure, not a measurement.
MFU = 0.4

EXAMPLES = "v5e:2x2, v5e:16x16, v6e:8x8, v4:2x2x2, v5p:2x2x4, v5p:4x4x4"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: what a chip has and how JAX sees it."""

  name: str
  device_kind: str  # jax.Device.device_kind of its devices
  hbm_gib: float  # HBM per chip, as published
  usable_gib: float  # per device: the limit libtpu's compiler applies (its out-of-memory message says it)
  peak_tflops: float  # dense bf16 TFLOP/s per chip, as published
  accelerator_type: str  # TPU_ACCELERATOR_TYPE of a slice: format with chips= or cores=
  devices_per_chip: int = 1  # JAX devices per chip (v4 and v5p: one megacore device of two cores)


# usable_gib: what libtpu 0.0.42.1 (jax[tpu]==0.10.2) says when a step does not fit ("exceeds available HBM
# (95.74G)"); on v5p that is above the published 95 GB. tpu7x (Ironwood) shows each chip as two devices.
CHIPS = {c.name: c for c in (
    Chip("v4", "TPU v4", 32, 30.75, 275, "v4-{cores}"),
    Chip("v5e", "TPU v5 lite", 16, 15.75, 197, "v5litepod-{chips}"),
    Chip("v5p", "TPU v5", 95, 95.74, 459, "v5p-{cores}"),
    Chip("v6e", "TPU v6 lite", 32, 31.25, 918, "v6e-{chips}"),
    Chip("tpu7x", "TPU7x", 192, 94.75, 2307, "tpu7x-{cores}", devices_per_chip=2),
)}

GIB = 2**30
MEMORY_FIELDS = ("argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes", "peak_memory_in_bytes")


def say(text: str) -> None:
  print(text, flush=True)  # a search's progress lines reach a pipe (tee, nohup) as they come


def chip_for(name: str) -> Chip | None:
  """The chip of a topology name ("v5p:4x4x4" -> v5p), None when the table lacks it."""
  gen = name.split(":")[0].strip().lower()
  return CHIPS.get(gen)


def topology_devices(name: str) -> tuple[list, Chip]:
  """The compile-only devices of TPU topology `name` (no chips needed) and their chip."""
  dims = re.fullmatch(r"([A-Za-z0-9]+):(\d+(?:x\d+){1,2})(_twisted|_untwisted)?", name.strip())
  chip = chip_for(name)
  if not dims or chip is None:
    what = "is not GENERATION:CHIPS" if not dims else f"names no chip of {', '.join(CHIPS)}"
    raise UserError(f"--topology {name!r} {what}; use e.g. {EXAMPLES}")
  chips = math.prod(int(d) for d in dims.group(2).split("x"))
  # libtpu reads these when it initialises; without them it warns that it found no TPU host.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", chip.accelerator_type.format(chips=chips, cores=2 * chips))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Any JAX process on a host with libtpu holds /tmp/libtpu_lockfile while it lives (it guards the
  # chips); compiling for a topology uses no chip, so it need not wait for the lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4's default chip config exposes each TensorCore as a device; jobs run it as one megacore device.
  options = {"chip_config_name": "megacore"} if chip.name == "v4" else {}
  from jax.experimental import topologies

  try:
    devices = topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices
  except RuntimeError as e:  # jax.errors.JaxRuntimeError, or "JAX TPU support not installed"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "TPU support not installed" in msg:
      raise UserError("--topology needs libtpu, the TPU compiler: pip install 'jax[tpu]' (CPU-only hosts too)")
    if "lockfile" in msg:
      raise UserError("--topology: another JAX process holds libtpu (/tmp/libtpu_lockfile); wait for it, or "
                       "drop ALLOW_MULTIPLE_LIBTPU_LOAD=0 from the environment")
    reason = re.sub(r"^[A-Z_]+: ", "", msg).split(" and does not match regex")[0]
    raise UserError(f"--topology {name!r}: libtpu does not know it ({reason}); use GENERATION:CHIPS such as "
                     f"{EXAMPLES}")
  kind = devices[0].device_kind
  chip = next((c for c in CHIPS.values() if c.device_kind == kind), None)
  if chip is None:
    raise UserError(f"--topology {name!r}: {kind!r} has no HBM and FLOP/s figures; add them to CHIPS in "
                     "llasm_jax/train/plan.py")
  return list(devices), chip


def data_parallel(config, num_devices: int, topology: str) -> int:
  """data x fsdp of the config's mesh over the topology's devices (the batch's split)."""
  try:
    sizes = sharding.mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    raise UserError(f"--topology {topology} ({num_devices} devices): {e}")
  return sizes["data"] * sizes["fsdp"]


def check_batch(config, dp: int, topology: str) -> None:
  """The global batch splits into grad_accum micro-batches, each over data x fsdp."""
  b, ga = config.train.batch_size, config.train.grad_accum
  step = ga * dp
  if b <= 0 or b % step:
    near = " or ".join(map(str, sorted({max(step, b // step * step), (b // step + 1) * step})))
    fewer = " (or fewer data x fsdp: --config.mesh.shape.tensor=2 halves them)" if b < step else ""
    raise UserError(f"config.train.batch_size {b} does not divide over grad_accum {ga} x data x fsdp {dp} "
                     f"({topology}); use a multiple of {step}, e.g. --config.train.batch_size={near}{fewer}")


def hbm_need(memory: dict[str, int]) -> int:
  """Bytes one device holds at its busiest: XLA's peak of the buffers live at once (arguments,
  temporaries and outputs, a donated argument's buffer counted once with the output reusing it).
  The sum of the kinds (arguments + temporaries + outputs not aliased) overstates it: the 7B
  stage-2 step at 40 rows per chip sums to 102 GiB, peaks at 79 GiB, and libtpu compiles it for
  v5p's 95.74 GiB (48 rows per chip it refuses)."""
  peak = memory.get("peak_memory_in_bytes", 0)
  return peak or (memory["argument_size_in_bytes"] + memory["temp_size_in_bytes"]
                  + memory["output_size_in_bytes"] - memory.get("alias_size_in_bytes", 0))


def _sizes_gib(message: str) -> list[float]:
  """The sizes libtpu's out-of-memory message names ("(137.49G) exceeds available HBM (95.74G)")."""
  scale = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}
  return [float(v) * scale[u] for v, u in re.findall(r"(\d+(?:\.\d+)?)([KMGT])i?B?\b", message)]


def with_remat(config: ml_collections.ConfigDict, policy: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose LLM layers use remat `policy` (the LLM holds nearly all activations;
  Whisper is frozen in both stages, so it keeps no activations for a backward pass)."""
  config = ml_collections.ConfigDict(config.to_dict())
  model = config.model.to_dict()
  model["llm"] = {**model.get("llm", {}), "remat_policy": policy}
  config.model = ml_collections.ConfigDict(model)
  return config


def with_batch(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = batch_size
  return config


def measure(config, devices: Sequence, chip: Chip) -> dict[str, Any]:
  """Compiles the train step of `config` on `devices`: per-device HBM (GiB), whether it fits, the
  model FLOPs. It fits when libtpu compiled it (past the HBM limit it stops with RESOURCE_EXHAUSTED,
  whose message holds the need) and its peak stays under the device's usable HBM."""
  out = trainer.compile_only(config, devices, quiet=True)
  got = dict(compile_s=out["compile_s"], mesh=out["mesh"], model_flops_per_step=out["model_flops_per_step"],
             usable_gib=chip.usable_gib)
  if "out_of_memory" in out:
    sizes = _sizes_gib(out["out_of_memory"])
    got.update(fits=False, compiler=out["out_of_memory"], need_gib=round(sizes[0], 3) if sizes else None)
    if len(sizes) > 1:
      got["usable_gib"] = round(sizes[1], 3)
    return got
  mem = out["memory_bytes"]
  need = hbm_need(mem) / GIB
  sum_of_kinds = (mem["argument_size_in_bytes"] + mem["temp_size_in_bytes"] + mem["output_size_in_bytes"]
                  - mem.get("alias_size_in_bytes", 0)) / GIB
  got.update(fits=need <= chip.usable_gib, need_gib=round(need, 3), sum_of_kinds_gib=round(sum_of_kinds, 3),
             **{k.replace("_in_bytes", "_gib"): round(mem[k] / GIB, 3) for k in MEMORY_FIELDS if k in mem})
  return got


def estimates(flops_per_step: float, num_devices: int, chip: Chip, tokens_per_step: int) -> dict[str, float]:
  """Step time from the model FLOPs at the chips' peak and at MFU (estimates, not measurements)."""
  chips = num_devices / chip.devices_per_chip
  per_chip = flops_per_step / chips
  at_peak = per_chip / (chip.peak_tflops * 1e12)
  at_mfu = at_peak / MFU
  return dict(model_flops_per_step=flops_per_step, model_flops_per_chip=per_chip, step_s_at_peak=at_peak,
              step_s_at_mfu=at_mfu, mfu_assumed=MFU, tokens_per_s_per_chip_at_mfu=tokens_per_step / at_mfu / chips)


def plan(config: ml_collections.ConfigDict, topology: str, *, name: str = "", log: Callable = say
         ) -> dict[str, Any]:
  """Compiles `config`'s train step for TPU `topology` ("v5p:4x4x4") and says whether it fits:
  one summary block through `log`, and the same as a JSON-able dict."""
  devices, chip = topology_devices(topology)
  n = len(devices)
  dp = data_parallel(config, n, topology)
  check_batch(config, dp, topology)
  tc, seq = config.train, config.data.seq_len
  got = measure(config, devices, chip)
  report = dict(config=name, topology=topology, chip=chip.name, chips=n // chip.devices_per_chip, devices=n,
                hosts=len({d.process_index for d in devices}), hbm_gib_per_chip=chip.hbm_gib,
                batch_size=tc.batch_size, per_chip_batch=tc.batch_size // dp, grad_accum=tc.grad_accum, seq_len=seq,
                remat_policy=model_config(config).llm.remat_policy, **got)
  report.update(estimates(got["model_flops_per_step"], n, chip, tc.batch_size * seq))
  if report["fits"]:
    report["margin_gib"] = round(report["usable_gib"] - report["need_gib"], 3)
    report["margin_pct"] = round(100 * report["margin_gib"] / report["usable_gib"], 1)
  log(summary(report))
  return report


def _size(gib: float) -> str:
  return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def summary(r: dict[str, Any]) -> str:
  """The result of `plan()` for people: one block."""
  per = "chip" if r["devices"] == r["chips"] else "device"
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  hosts = f"{r['hosts']} host" + ("s" if r["hosts"] > 1 else "")
  lines = [f"plan: {r['config'] or 'config'} on {r['topology']} ({r['chips']} chips {r['chip']}, {hosts}; "
           f"mesh {mesh}), compiled by libtpu in {r['compile_s']:.0f} s",
           f"  batch          {r['batch_size']} global = {r['per_chip_batch']} per chip x "
           f"{r['batch_size'] // r['per_chip_batch']} (data x fsdp), grad_accum {r['grad_accum']}, "
           f"seq_len {r['seq_len']}; LLM remat {r['remat_policy']!r}"]
  usable = f"of {r['usable_gib']:.2f} GiB usable ({r['hbm_gib_per_chip']:g} GiB HBM per chip)"
  if "peak_memory_gib" in r:
    unaliased = r["output_size_gib"] - r["alias_size_gib"]
    lines += [f"  HBM per {per:<6} {_size(r['need_gib'])} at the peak {usable}",
              f"                 arguments {_size(r['argument_size_gib'])} + temporaries {_size(r['temp_size_gib'])} + "
              f"outputs not aliased {_size(unaliased)} = {_size(r['sum_of_kinds_gib'])} if all were live at once"]
  else:
    lines.append(f"  HBM per {per:<6} libtpu: {r['compiler']}")
  if r["fits"]:
    lines.append(f"  fits           yes: {_size(r['margin_gib'])} ({r['margin_pct']:.1f}%) to spare")
  else:
    need = f"needs {r['need_gib']:.2f} {usable}" if r.get("need_gib") else "over the limit"
    lines.append(f"  fits           NO: {need}")
  lines += [f"  model FLOPs    {r['model_flops_per_step']:.3g} per step, {r['model_flops_per_chip']:.3g} per chip "
            "(metrics.model_flops_per_step; XLA's cost analysis counts a scanned layer once)",
            f"  step time      estimates: {r['step_s_at_peak']:.3g} s at the peak {CHIPS[r['chip']].peak_tflops:g} "
            f"TFLOP/s per chip, {r['step_s_at_mfu']:.3g} s at {100 * r['mfu_assumed']:.0f}% MFU "
            f"({r['tokens_per_s_per_chip_at_mfu']:,.0f} tokens/s per chip)"]
  return "\n".join(lines)


def no_fit_error(r: dict[str, Any]) -> str:
  """One line: the plan does not fit, and what to change."""
  return (f"{r['config'] or 'config'} does not fit {r['topology']} at batch {r['batch_size']} "
          f"({r['per_chip_batch']} per chip): lower --config.train.batch_size, raise grad_accum, shard more "
          "(config.mesh.shape fsdp), remat more (--config.model.llm.remat_policy=full), or take a bigger slice; "
          "`--search` finds the largest batch that fits")


def largest_fitting(fits: Callable[[int], bool], cap: int, start: int = 1) -> int:
  """The largest n in 1..cap with fits(n), 0 if none; fits must hold up to some n and fail after.
  Doubling from `start` to the first failure (or halving to the first fit), then bisection:
  about 2 log2(n / start) calls."""
  n = min(max(1, start), cap)
  if fits(n):
    lo, n = n, 2 * n
    while n <= cap and fits(n):
      lo, n = n, 2 * n
    hi = min(n, cap + 1)  # the smallest n known not to fit, or past the cap
  else:
    hi, n = n, n // 2
    while n >= 1 and not fits(n):
      hi, n = n, n // 2
    lo = n
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def search(config: ml_collections.ConfigDict, topology: str, *, policies: Sequence[str] = (), max_per_chip: int = 256,
           name: str = "", log: Callable = say) -> dict[str, Any]:
  """For each LLM remat policy, the largest per-chip batch (rows per data x fsdp shard and step,
  a multiple of grad_accum) whose train step fits `topology`; a table through `log`."""
  policies = list(policies) or list(REMAT_POLICIES)
  unknown = [p for p in policies if p not in REMAT_POLICIES]
  if unknown:
    raise UserError(f"--search {unknown[0]!r}: remat policies are {', '.join(REMAT_POLICIES)}")
  devices, chip = topology_devices(topology)
  n = len(devices)
  dp = data_parallel(config, n, topology)
  ga = config.train.grad_accum
  t0 = time.perf_counter()
  rows, tried = [], []

  def fits(base, policy: str, points: dict[int, dict], k: int) -> bool:
    got = points[k] = measure(with_batch(base, k * ga * dp), devices, chip)
    tried.append(dict(policy=policy, per_chip_batch=k * ga, batch_size=k * ga * dp, **got))
    verdict = "fits" if got["fits"] else "does not fit"
    need = f"{got['need_gib']:.2f} GiB, " if got.get("need_gib") else ""
    log(f"  {policy:<16} per chip {k * ga:>5}: {need}{verdict} ({got['compile_s']:.0f} s)")
    return got["fits"]

  for policy in policies:
    points: dict[int, dict] = {}
    k = largest_fitting(functools.partial(fits, with_remat(config, policy), policy, points),
                        max(1, max_per_chip // ga), start=config.train.batch_size // (ga * dp))
    row = dict(policy=policy, per_chip_batch=k * ga, batch_size=k * ga * dp)
    if k:
      best = points[k]
      row.update(need_gib=best["need_gib"], usable_gib=best["usable_gib"],
                 **estimates(best["model_flops_per_step"], n, chip, k * ga * dp * config.data.seq_len))
    rows.append(row)
  result = dict(config=name, topology=topology, chip=chip.name, chips=n // chip.devices_per_chip, devices=n,
                data_x_fsdp=dp, grad_accum=ga, seq_len=config.data.seq_len, max_per_chip=max_per_chip,
                search_s=round(time.perf_counter() - t0, 1), compiles=len(tried), results=rows, tried=tried)
  log(search_table(result))
  return result


def search_table(r: dict[str, Any]) -> str:
  """The result of `search()` for people."""
  lines = [f"largest per-chip batch that fits {r['topology']} ({r['chips']} chips {r['chip']}; global = per chip x "
           f"{r['data_x_fsdp']} data x fsdp; seq_len {r['seq_len']}; {r['compiles']} compiles, {r['search_s']:.0f} s)",
           f"  {'LLM remat':<16} {'per chip':>8} {'global':>7} {'HBM GiB (of usable)':>20} {'FLOPs/step':>11} "
           f"{'est. s/step @' + format(100 * MFU, '.0f') + '% MFU':>21}"]
  for row in r["results"]:
    if not row["per_chip_batch"]:
      lines.append(f"  {row['policy']:<16} {'none fits':>8}")
      continue
    capped = "+" if row["per_chip_batch"] >= r["max_per_chip"] else ""
    hbm = f"{row['need_gib']:.2f} ({100 * row['need_gib'] / row['usable_gib']:.0f}%)"
    lines.append(f"  {row['policy']:<16} {str(row['per_chip_batch']) + capped:>8} {row['batch_size']:>7} {hbm:>20} "
                 f"{row['model_flops_per_step']:>11.3g} {row['step_s_at_mfu']:>21.3g}")
  if any(row["per_chip_batch"] >= r["max_per_chip"] for row in r["results"]):
    lines.append(f"  (+: the search stopped at --max-batch {r['max_per_chip']} per chip)")
  return "\n".join(lines)
