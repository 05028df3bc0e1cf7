"""The Ultravox adaptor against a PyTorch projector written here as Ultravox defines it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llasm_jax.convert.keymap import MLP_ADAPTOR_RULES, KeyMap
from llasm_jax.convert.hf import export_tensors
from llasm_jax.errors import UserError
from llasm_jax.models.adaptor import UltravoxAdaptor, text_scale
from llasm_jax.models.llasm import LLASM_PRESETS, Llasm

E, K, H, D = 16, 3, 24, 20


class TorchUltravoxProjector(torch.nn.Module):
  """fixie-ai/ultravox `UltravoxProjector` (v0.4: RMSNorm after linear_2), from its definition:
  zero-pad T to a multiple of k and stack, RMSNorm (eps 1e-6), Linear without bias, SwiGLU with
  `x, gate = chunk(2)` -> silu(gate) * x, Linear without bias, RMSNorm."""

  def __init__(self):
    super().__init__()
    self.ln_pre = torch.nn.RMSNorm(K * E, eps=1e-6)
    self.linear_1 = torch.nn.Linear(K * E, H, bias=False)
    self.linear_2 = torch.nn.Linear(H // 2, D, bias=False)
    self.ln_post = torch.nn.RMSNorm(D, eps=1e-6)

  def forward(self, x):  # float[B, T, E]
    b, t, e = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, -t % K)).reshape(b, -1, K * e)
    value, gate = self.linear_1(self.ln_pre(x)).chunk(2, dim=-1)
    return self.ln_post(self.linear_2(torch.nn.functional.silu(gate) * value))


def random_adaptor(seed=0):
  adaptor = UltravoxAdaptor(E, D, K, H, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  # Norm scales away from 1 and kernels large enough that the SwiGLU is far from linear.
  adaptor.ln_pre.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, K * E), jnp.float32)
  adaptor.ln_post.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.float32)
  for lin in (adaptor.linear_1, adaptor.linear_2):
    lin.kernel[...] = jnp.asarray(rng.normal(0, 0.5, lin.kernel.shape), jnp.float32)
  return adaptor


def test_ultravox_adaptor_matches_pytorch_projector():
  adaptor = random_adaptor()
  reference = TorchUltravoxProjector()
  # Our HF names are Ultravox's module names under `model.audio_adaptor.`: a strict load checks both.
  tensors = export_tensors(adaptor, [KeyMap(MLP_ADAPTOR_RULES)])
  assert sorted(tensors) == sorted(f"model.audio_adaptor.{n}.weight" for n in ("ln_pre", "linear_1", "linear_2",
                                                                                "ln_post"))
  reference.load_state_dict({k.removeprefix("model.audio_adaptor."): torch.tensor(v) for k, v in tensors.items()},
                            strict=True)
  # Two audios in a batch; the second is shorter, padded with garbage past its frames. Each one
  # must come out as the reference computes it alone, on its own frames.
  rng = np.random.default_rng(1)
  x = rng.normal(0, 2, (2, 11, E)).astype(np.float32)
  frames = np.array([11, 7])
  out, tokens = adaptor(jnp.asarray(x), jnp.asarray(frames))
  assert out.shape == (2, 4, D) and tokens.tolist() == [4, 3]
  for b in range(2):
    with torch.no_grad():
      ref = reference(torch.tensor(x[b:b + 1, :frames[b]]))[0].numpy()
    np.testing.assert_allclose(np.asarray(out[b, :tokens[b]]), ref, atol=1e-5, rtol=1e-5)
  assert np.abs(ref).max() > 0.1  # not trivially small


def test_ultravox_adaptor_trains_through_its_norms():
  adaptor = random_adaptor()
  x = jnp.asarray(np.random.default_rng(2).normal(0, 1, (1, 6, E)), jnp.float32)

  def loss(model):
    return jnp.sum(model(x, jnp.array([6]))[0] ** 2)

  grads = nnx.grad(loss)(adaptor)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
    assert np.abs(np.asarray(g)).max() > 0, path


def test_text_scale_is_the_rms_of_each_width():
  table = np.random.default_rng(3).normal(0, 1, (10, 5)).astype(np.float32) * np.arange(1, 6)
  want = np.sqrt(np.mean(np.asarray(table[:7], np.float64) ** 2, axis=0))
  # Chunks that do not divide the rows, and the padding rows past the vocab left out.
  np.testing.assert_allclose(np.asarray(text_scale(table, 7, rows_per_chunk=3)), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(text_scale(table, rows_per_chunk=4)),
                             np.sqrt(np.mean(np.asarray(table, np.float64) ** 2, axis=0)), rtol=1e-6)


def test_fresh_llasm_scales_the_ultravox_output_like_its_text_embeddings():
  cfg = LLASM_PRESETS["tiny_encoder"].replace(adaptor="ultravox")
  model = Llasm(cfg, rngs=nnx.Rngs(0))
  emb = np.asarray(model.llm.model.embed_tokens.embedding[...])[:cfg.llm.vocab_size]
  np.testing.assert_allclose(np.asarray(model.adaptor.ln_post.weight[...]), np.sqrt(np.mean(emb ** 2, axis=0)),
                             rtol=1e-5)
  # The mlp default is untouched: same parameter tree as before the option existed.
  mlp = Llasm(LLASM_PRESETS["tiny_encoder"], rngs=nnx.Rngs(0))
  assert sorted(nnx.to_pure_dict(nnx.state(mlp.adaptor))) == ["linear_1", "linear_2"]
  assert mlp.adaptor.linear_1.bias is not None


def test_adaptor_choice_is_checked():
  base = LLASM_PRESETS["tiny_encoder"]
  with pytest.raises(UserError, match=r"adaptor 'bogus': expected one of \('mlp', 'ultravox'\)"):
    base.replace(adaptor="bogus")
  with pytest.raises(UserError, match="'encoder'-mode projector"):
    LLASM_PRESETS["tiny"].replace(adaptor="ultravox")
  with pytest.raises(UserError, match="even width"):
    Llasm(base.replace(adaptor="ultravox", adaptor_hidden=33), rngs=nnx.Rngs(0))


def test_run_config_selects_the_projector():
  from llasm_jax.config import llasm_config

  cfg = llasm_config({"preset": "tiny_encoder", "adaptor": "ultravox"})
  assert cfg.adaptor == "ultravox" and isinstance(Llasm(cfg, rngs=nnx.Rngs(0)).adaptor, UltravoxAdaptor)
  assert llasm_config({"preset": "tiny_encoder"}).adaptor == "mlp"
  with pytest.raises(UserError, match="adaptor 'bogus'"):
    llasm_config({"preset": "tiny_encoder", "adaptor": "bogus"})
