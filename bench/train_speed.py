"""Train-step speed of llasm_jax vs the same step in PyTorch (transformers models), same CPU, same shapes.

  python bench/train_speed.py [--models tiny,100m] [--steps 5]

For each model: tokens/s and seconds/step of the jitted JAX train step (stage 2: adaptor + LLM
train, AdamW, float32), the share of this machine's measured float32 matmul peak (model FLOPs
/ step time / peak), and the same step in PyTorch (WhisperEncoder + the stacked-frame MLP
adaptor + LlamaForCausalLM on spliced inputs_embeds, torch.optim.AdamW) as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llasm_jax.config import load_config_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # preset, batch, seq_len, mel frames
    "tiny": ("tiny_encoder", 8, 128, 400),
    "100m": ("llasm_100m_encoder", 4, 256, 800),
}


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def jax_step(name: str, steps: int) -> dict:
  from flax import nnx
  from llasm_jax.config import llasm_config
  from llasm_jax.models.llasm import Llasm
  from llasm_jax.train.optim import make_optimizer, param_labels
  from llasm_jax.train.step import TrainState, make_train_step
  from llasm_jax.train.synthetic import make_example
  from llasm_jax.train.metrics import model_flops_per_step

  preset, batch, seq, frames = MODELS[name]
  config = load_config_file(os.path.join(ROOT, "configs", "tiny.py") + ":stage2")
  config.model = {"preset": preset}
  config.train.batch_size, config.data.seq_len, config.data.mel_frames = batch, seq, frames
  cfg = llasm_config(config.model)
  model = Llasm(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  labels = param_labels(params, config.train.trainable)
  tx = make_optimizer(config.optim, labels, 1000)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  examples = [make_example(cfg, config.data, 0, i) for i in range(batch)]
  host = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  step = jax.jit(make_train_step(graphdef, tx, labels, grad_accum=1), donate_argnums=(0,))
  t0 = time.perf_counter()
  state, m = step(state, host)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, host)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  s = float(np.median(times))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  flops = model_flops_per_step(cfg, config, trainable_llm=True)
  return dict(params_m=round(n_params / 1e6, 1), batch=batch, seq_len=seq, compile_s=round(compile_s, 1),
              s_per_step=round(s, 4), tokens_per_s=round(batch * seq / s, 1), model_gflop_per_step=round(flops / 1e9, 2),
              achieved_gflops=round(flops / s / 1e9, 1), cfg=cfg, host=host, loss=float(m["loss"]))


def torch_step(cfg, host, steps: int) -> dict:
  import torch
  import transformers as tf

  torch.manual_seed(0)
  w, l = cfg.audio, cfg.llm
  whisper = tf.WhisperConfig(num_mel_bins=w.num_mel_bins, d_model=w.d_model, encoder_layers=w.encoder_layers,
                             encoder_attention_heads=w.encoder_attention_heads, encoder_ffn_dim=w.encoder_ffn_dim,
                             decoder_layers=1, decoder_attention_heads=w.decoder_attention_heads,
                             vocab_size=w.vocab_size, max_source_positions=host["mel"].shape[-1] // 2)
  encoder = tf.models.whisper.modeling_whisper.WhisperEncoder(whisper).eval()
  encoder.requires_grad_(False)
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(
      vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
      num_hidden_layers=l.num_hidden_layers, num_attention_heads=l.num_attention_heads,
      num_key_value_heads=l.num_key_value_heads, attn_implementation="sdpa"))
  k = cfg.stack_factor
  adaptor = torch.nn.Sequential(torch.nn.Linear(k * w.d_model, l.hidden_size), torch.nn.GELU(),
                                torch.nn.Linear(l.hidden_size, l.hidden_size))
  opt = torch.optim.AdamW(list(llm.parameters()) + list(adaptor.parameters()), lr=1e-4)
  ids = torch.tensor(host["input_ids"], dtype=torch.long)
  labels = torch.tensor(host["labels"], dtype=torch.long)
  mask = torch.tensor(host["attention_mask"])
  mel = torch.tensor(host["mel"][:, 0])
  patch = ids == cfg.audio_patch_id

  def step():
    with torch.no_grad():
      states = encoder(mel).last_hidden_state
    b, t, e = states.shape
    states = torch.nn.functional.pad(states, (0, 0, 0, -t % k)).reshape(b, -1, k * e)
    audio = adaptor(states)
    embeds = llm.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter(patch[..., None], audio[:, :int(patch[0].sum())].reshape(-1, embeds.shape[-1]))
    loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(llm.parameters()) + list(adaptor.parameters()), 1.0)
    opt.step()

  step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  s = float(np.median(times))
  return dict(s_per_step=round(s, 4), tokens_per_s=round(ids.numel() / s, 1), threads=torch.get_num_threads())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="tiny,100m")
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args()
  peak = matmul_peak_gflops()
  out = {"device": f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores",
         "measured_f32_matmul_peak_gflops": round(peak, 1), "models": {}}
  for name in args.models.split(","):
    j = jax_step(name, args.steps)
    t = torch_step(j.pop("cfg"), j.pop("host"), args.steps)
    j["share_of_matmul_peak"] = round(j["achieved_gflops"] / peak, 3)
    out["models"][name] = dict(jax=j, torch=t, jax_speedup_vs_torch=round(t["s_per_step"] / j["s_per_step"], 2))
    print(json.dumps({name: out["models"][name]}), flush=True)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
