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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402

from llasm_jax.convert.configs import llama_config_to_hf  # noqa: E402
from llasm_jax.convert.hf import keymaps, load_tensors  # noqa: E402
from llasm_jax.infer import Engine  # noqa: E402
from llasm_jax.models.llama import LLAMA_PRESETS, LlamaForCausalLM  # noqa: E402

MODELS = {"tiny": "tiny", "100m": "llama_100m"}


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

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; {os.cpu_count()} CPUs; prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, greedy, float32")
  header = (f"{'model':>6} {'params':>7} {'batch':>5} | {'prefill ms':>21} {'ratio':>6} | "
            f"{'decode tokens/s':>21} {'ratio':>6}")
  print(header + f"\n{'':>21} | {'jax':>10} {'torch':>10} {'':>6} | {'jax':>10} {'torch':>10}\n" + "-" * len(header))
  rows = []
  for name in args.models.split(","):
    hf, model, params = build(MODELS[name])
    vocab = model.cfg.vocab_size
    for batch in map(int, args.batches.split(",")):
      prompts = np.random.default_rng(batch).integers(3, vocab, (batch, args.prompt_len)).tolist()
      jp, jd = bench_jax(model, prompts, args.new_tokens, args.repeats)
      tp, td = bench_torch(hf, prompts, args.new_tokens, args.repeats)
      row = dict(model=name, params=params, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                 jax_prefill_s=jp, torch_prefill_s=tp, prefill_speedup=tp / jp,
                 jax_decode_tokens_per_s=jd, torch_decode_tokens_per_s=td, decode_ratio=jd / td)
      rows.append(row)
      print(f"{name:>6} {params / 1e6:6.1f}M {batch:>5} | {jp * 1e3:10.1f} {tp * 1e3:10.1f} {tp / jp:6.2f} | "
            f"{jd:10.1f} {td:10.1f} {jd / td:6.2f}", flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
