"""Stage 2 with LoRA (config.train.lora) against full stage 2, same model, shapes and data: optimizer
state, step time, compiled memory.

  python bench/lora_speed.py [--preset llasm_100m_encoder] [--batch 4] [--seq-len 256] [--steps 4] \
      [--out bench/results/lora_cpu2.json]

Each variant runs the trainer's own step (`setup.prepare`: the labels, AdamW, shardings and
jit of `llasm-jax train`) on synthetic batches, float32, one device: "full" trains the adaptor and
every LLM weight; "lora_qv_r8" the adaptor and rank-8 factors on q_proj and v_proj (the default
targets); "lora_all_r16" rank 16 on all seven projections. Reported: trainable parameters, the
optimizer state's bytes (Adam's two moments of each trainable leaf, plus scalar counters), the
compiled step's temporary bytes (XLA's memory analysis: activations and gradients), and the
median seconds per step after the compiling one. The load average is recorded next to the numbers:
other processes on the machine slow every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_name  # noqa: E402  (bench/machine.py, beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # name -> config.train.lora (None: full stage 2)
    "full": None,
    "lora_qv_r8": {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": ("llm/.*(q_proj|v_proj)",)},
    "lora_all_r16": {"rank": 16, "alpha": 32.0, "dropout": 0.05, "targets": ("llm/.*_proj",)},
}


def machine() -> dict:
  import jax

  return {"device": f"{jax.devices()[0].platform} x{jax.device_count()}", "cpu": cpu_name(), "cores": os.cpu_count(),
          "jax": jax.__version__}


def run(variant: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from llasm_jax.config import load_config_file
  from llasm_jax.data import global_batch
  from llasm_jax.train.optim import FROZEN
  from llasm_jax.train.setup import initial_params, make_data, prepare
  from llasm_jax.train.step import TrainState

  config = load_config_file(os.path.join(ROOT, "configs", "tiny.py") + ":stage2")
  config.model = {"preset": args.preset}
  config.train.batch_size, config.data.seq_len, config.data.mel_frames = args.batch, args.seq_len, args.mel_frames
  if VARIANTS[variant]:
    config.train.lora = VARIANTS[variant]
  setup = prepare(config)
  sh = setup.state_sharding
  params, rest = initial_params(config, setup.cfg, setup.mesh, setup.rules, sh.params, sh.rest)
  with jax.set_mesh(setup.mesh):
    opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=opt_state,
                     rng=jax.random.key_data(jax.random.key(0)))
  data, _ = make_data(config, setup.cfg)
  batch = global_batch.to_global(next(data), setup.mesh, setup.rules, same_shape=True)
  t0 = time.perf_counter()
  compiled = setup.compile(batch)
  compile_s = time.perf_counter() - t0
  leaves, labels = jax.tree.leaves(params), jax.tree.leaves(setup.labels)
  trainable = sum(int(x.size) for x, lab in zip(leaves, labels) if lab != FROZEN)
  opt_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state.opt_state))
  temp = compiled.memory_analysis().temp_size_in_bytes
  times, losses, load = [], [], os.getloadavg()[0]
  for _ in range(args.steps + 1):  # the first includes the transfer and warm-up: left out
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))
    times.append(time.perf_counter() - t0)
  return dict(trainable_params=trainable, all_params=sum(int(x.size) for x in leaves),
              opt_state_mib=round(opt_bytes / 2**20, 2), step_temp_mib=round(temp / 2**20, 1),
              compile_s=round(compile_s, 1), s_per_step=round(float(np.median(times[1:])), 3),
              tokens_per_s=round(args.batch * args.seq_len / float(np.median(times[1:])), 1),
              losses=[round(x, 4) for x in losses], load=[round(load, 2), round(os.getloadavg()[0], 2)])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="llasm_100m_encoder")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--mel-frames", type=int, default=800)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--out", help="write the results as JSON here")
  args = ap.parse_args()
  results = {"machine": machine(), "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
             "mel_frames": args.mel_frames, "steps": args.steps, "variants": {}}
  for name in args.variants.split(","):
    results["variants"][name] = {"lora": VARIANTS[name], **run(name, args)}
    print(json.dumps({name: results["variants"][name]}), flush=True)
  full = results["variants"].get("full")
  if full:
    for name, row in results["variants"].items():
      row["opt_state_vs_full"] = round(row["opt_state_mib"] / full["opt_state_mib"], 4)
      row["speedup_vs_full"] = round(full["s_per_step"] / row["s_per_step"], 2)
  print(json.dumps(results, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
