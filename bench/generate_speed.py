"""Generation speed of llasm_jax (KV-cache engine) vs `transformers` `generate` (PyTorch), same CPU, same shapes.

  python bench/generate_speed.py [--models tiny,100m] [--batches 1,8] [--prompt-len 128] [--new-tokens 64]
                                 [--repeats 5] [--json bench/results/generate_speed.json]

For each model (the `tiny` and `llama_100m` presets of models/llama.py, random float32 weights,
the same weights in both frameworks) and batch size: the prefill time of the prompts and the
decode tokens/s (over all rows, the tokens after the first), greedy, a fixed number of new
tokens (no EOS). The PyTorch prefill is one forward over the prompts with the cache on; its
decode rate is timed inside one generate(N) call (a streamer clocks each token): the N - 1
steps after the first token. Best of --repeats runs (the CPU
may be shared: the best run is the least disturbed one), after a warm-up run (which compiles
the JAX buckets). Ratios > 1 mean llasm_jax is faster.

Each row also gives the decode roofline of this machine and each framework's share of it. A
decode step must read every weight once (the embedding table excepted: B rows of it) and the
keys and values of the tokens before it; it computes 2 FLOPs per weight per row (plus the
attention). Roofline tokens/s = B / max(bytes / bandwidth, FLOPs / matmul peak), with the read
bandwidth (a jitted sum over a 512 MB float32 array, both cores) and the float32 matmul peak
(2048^3) measured on this machine: best of several runs, measured again before every row (on a
shared machine the bandwidth moves with the neighbours' load; the best seen is the roofline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402

from machine import cpu_name  # noqa: E402  (bench/machine.py, beside this script)
from llasm_jax.convert.configs import llama_config_to_hf  # noqa: E402
from llasm_jax.convert.hf import keymaps, load_tensors  # noqa: E402
from llasm_jax.infer import Engine  # noqa: E402
from llasm_jax.models.llama import LLAMA_PRESETS, LlamaForCausalLM  # noqa: E402

MODELS = {"tiny": "tiny", "100m": "llama_100m"}


def _best_seconds(fn, repeats: int) -> float:
  fn()  # compiles
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 10) -> float:
  """Read bandwidth, GB/s: a jitted float32 sum over `megabytes` (far beyond the caches)."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return x.nbytes / _best_seconds(lambda: total(x).block_until_ready(), repeats) / 1e9


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
  """float32 matmul GFLOP/s of an n x n x n product."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / _best_seconds(lambda: f(a).block_until_ready(), repeats) / 1e9


def decode_roofline(cfg, batch: int, prompt_len: int, new_tokens: int, bandwidth_gbs: float,
                    peak_gflops: float) -> dict:
  """Tokens/s a decode step of `cfg` (float32) could reach on this machine, from what it must read
  and compute: every weight once (not the embedding table, unless the head is tied to it), and the
  keys and values of the tokens before it (prompt_len + new_tokens / 2 on average)."""
  d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_head_dim
  weights = l * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f) + cfg.padded_vocab * d
  context = prompt_len + new_tokens / 2
  kv_bytes = 2 * l * batch * k * h * context * 4
  step_bytes = weights * 4 + kv_bytes
  step_flops = 2 * batch * weights + 4 * l * batch * n * h * context
  seconds = max(step_bytes / (bandwidth_gbs * 1e9), step_flops / (peak_gflops * 1e9))
  return dict(step_mb=step_bytes / 1e6, step_gflop=step_flops / 1e9, tokens_per_s=batch / seconds)


def build(preset: str):
  """The HF model (random init) and the llasm_jax model holding the same weights."""
  import torch
  import transformers as tf

  cfg = LLAMA_PRESETS[preset]
  torch.manual_seed(0)
  hf = tf.LlamaForCausalLM(tf.LlamaConfig(**llama_config_to_hf(cfg))).eval()
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  load_tensors(model, ((k, v.numpy()) for k, v in hf.state_dict().items()), keymaps("llama"))
  params = sum(p.numel() for p in hf.parameters())
  return hf, model, params


def bench_jax(model, prompts, new_tokens, repeats):
  engine = Engine(model, eos_ids=[])
  engine.generate(prompts, max_new_tokens=new_tokens)  # compiles this (batch, length) bucket
  runs = [engine.generate(prompts, max_new_tokens=new_tokens)[1] for _ in range(repeats)]
  assert all(r.decode_steps == new_tokens - 1 for r in runs)
  return min(r.prefill_s for r in runs), max(r.decode_tokens_per_s for r in runs)


def bench_torch(hf, prompts, new_tokens, repeats):
  import torch
  from transformers.generation.streamers import BaseStreamer

  class Clock(BaseStreamer):
    """Time of each `put`: the prompt, then every generated token (the whole batch's)."""

    def __init__(self):
      self.times = []

    def put(self, value):
      self.times.append(time.perf_counter())

    def end(self):
      pass

  ids = torch.tensor(prompts)

  def decode_rate():
    clock = Clock()
    with torch.no_grad():
      # min_new_tokens = N: exactly N tokens, whatever the random model predicts.
      hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  streamer=clock)
    assert len(clock.times) == new_tokens + 1
    return len(prompts) * (new_tokens - 1) / (clock.times[-1] - clock.times[1])

  def prefill_s():
    t0 = time.perf_counter()
    with torch.no_grad():
      hf(ids, use_cache=True, logits_to_keep=1)  # as generate's prefill: the last position's logits
    return time.perf_counter() - t0

  decode_rate()  # warm-up
  return min(prefill_s() for _ in range(repeats)), max(decode_rate() for _ in range(repeats))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="tiny,100m")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--prompt-len", type=int, default=128)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--json", help="also write the rows to this file")
  args = ap.parse_args()

  import jax
  import torch

  bandwidths, peaks = [memory_bandwidth_gbs()], [matmul_peak_gflops()]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; {os.cpu_count()} CPUs ({cpu_name()}); prompt {args.prompt_len} "
        f"tokens, {args.new_tokens} new tokens, greedy, float32")
  header = (f"{'model':>6} {'params':>7} {'batch':>5} | {'prefill ms':>21} {'ratio':>6} | "
            f"{'decode tokens/s':>21} {'ratio':>6} | {'roofline':>8} {'of roofline':>15}")
  print(header + f"\n{'':>21} | {'jax':>10} {'torch':>10} {'':>6} | {'jax':>10} {'torch':>10} {'':>6} | "
        f"{'tok/s':>8} {'jax':>7} {'torch':>7}\n" + "-" * len(header))
  measured = []
  for name in args.models.split(","):
    hf, model, params = build(MODELS[name])
    vocab = model.cfg.vocab_size
    for batch in map(int, args.batches.split(",")):
      prompts = np.random.default_rng(batch).integers(3, vocab, (batch, args.prompt_len)).tolist()
      jp, jd = bench_jax(model, prompts, args.new_tokens, args.repeats)
      tp, td = bench_torch(hf, prompts, args.new_tokens, args.repeats)
      bandwidths.append(memory_bandwidth_gbs())
      measured.append((name, params, model.cfg, batch, jp, jd, tp, td))
  bandwidth, peak = max(bandwidths), max(peaks)
  rows = []
  for name, params, cfg, batch, jp, jd, tp, td in measured:
    roof = decode_roofline(cfg, batch, args.prompt_len, args.new_tokens, bandwidth, peak)
    rt = roof["tokens_per_s"]
    rows.append(dict(model=name, params=params, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     jax_prefill_s=jp, torch_prefill_s=tp, prefill_speedup=tp / jp,
                     jax_decode_tokens_per_s=jd, torch_decode_tokens_per_s=td, decode_ratio=jd / td,
                     roofline_step_mb=roof["step_mb"], roofline_step_gflop=roof["step_gflop"],
                     roofline_tokens_per_s=rt, jax_of_roofline=jd / rt, torch_of_roofline=td / rt))
    print(f"{name:>6} {params / 1e6:6.1f}M {batch:>5} | {jp * 1e3:10.1f} {tp * 1e3:10.1f} {tp / jp:6.2f} | "
          f"{jd:10.1f} {td:10.1f} {jd / td:6.2f} | {rt:8.1f} {jd / rt:7.0%} {td / rt:7.0%}", flush=True)
  print(f"roofline: {bandwidth:.1f} GB/s read (measured {min(bandwidths):.1f}-{bandwidth:.1f} over the run), "
        f"{peak:.0f} GFLOP/s float32 matmul; a decode step reads "
        + ", ".join(f"{r['roofline_step_mb']:.1f} MB ({r['model']} batch {r['batch']})" for r in rows))
  machine = dict(cpu=cpu_name(), cpus=os.cpu_count(), platform=platform.platform(), jax=jax.__version__,
                 torch=torch.__version__, torch_threads=torch.get_num_threads(), bandwidth_gbs=bandwidth,
                 bandwidths_gbs=bandwidths, matmul_peak_gflops=peak)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(dict(machine=machine, rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
