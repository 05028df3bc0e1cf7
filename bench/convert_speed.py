"""Conversion speed (MiB/s) and peak RSS against the checkpoint size, on a synthetic LLaMA checkpoint.

  python bench/convert_speed.py [--gib 2.5] [--dtype float32|bfloat16] [--workdir /tmp/llasm_bench]

Writes a sharded safetensors LLaMA-shaped checkpoint of about --gib GiB (float32, random
values), then runs `llasm-jax convert` on it in a child process and reports wall time,
MiB/s and the child's peak RSS. The budget from issue 3: peak RSS < checkpoint size + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import save_file

HIDDEN, INTER, VOCAB, HEADS = 2048, 5632, 32000, 16


def layer_tensors(i: int, rng) -> dict[str, np.ndarray]:
  def w(*shape):
    return rng.standard_normal(shape, dtype=np.float32) * 0.02

  p = f"model.layers.{i}."
  return {
      p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": w(HIDDEN, HIDDEN),
      p + "self_attn.v_proj.weight": w(HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
      p + "mlp.gate_proj.weight": w(INTER, HIDDEN), p + "mlp.up_proj.weight": w(INTER, HIDDEN),
      p + "mlp.down_proj.weight": w(HIDDEN, INTER),
      p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
      p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
  }


def write_checkpoint(folder: str, gib: float) -> tuple[int, int]:
  per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN) * 4
  fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 4
  layers = max(1, round((gib * 2**30 - fixed) / per_layer))
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  weight_map = {}
  shards = [{"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32) * 0.02,
             "model.norm.weight": np.ones(HIDDEN, np.float32),
             "lm_head.weight": rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32) * 0.02}]
  shards += [layer_tensors(i, rng) for i in range(layers)]
  n = len(shards)
  for k, tensors in enumerate(shards):
    name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
    weight_map.update({t: name for t in tensors})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
                   intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                   num_key_value_heads=HEADS, rms_norm_eps=1e-5, max_position_embeddings=4096), f)
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
  return size, layers


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--gib", type=float, default=2.5)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--workdir", default="/tmp/llasm_bench_convert")
  args = ap.parse_args()
  src, out = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "converted")
  if not os.path.exists(os.path.join(src, "config.json")):
    t0 = time.perf_counter()
    size, layers = write_checkpoint(src, args.gib)
    print(f"wrote synthetic checkpoint: {layers} layers, {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
  size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
  shutil.rmtree(out, ignore_errors=True)
  cmd = [sys.executable, "-m", "llasm_jax.cli", "convert", "--llm", src, "--out", out, "--dtype", args.dtype]
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), stderr=subprocess.DEVNULL)
  wall = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  print(json.dumps({
      "checkpoint_gib": round(size / 2**30, 3), "dtype": args.dtype, "wall_s": round(wall, 2),
      "mib_per_s": round(size / 2**20 / wall, 1), "peak_rss_gib": round(peak / 2**30, 3),
      "budget_gib": round(size / 2**30 + 1, 3), "within_budget": peak < size + 2**30}, indent=1))


if __name__ == "__main__":
  main()
