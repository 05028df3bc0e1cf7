"""LLaMA-family port against `transformers` PyTorch (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from llasm_jax.convert.configs import llama_config_from_hf
from llasm_jax.convert.hf import keymaps, load_tensors
from llasm_jax.errors import UserError
from llasm_jax.layers.stack import unstack_layers
from llasm_jax.models.llama import LlamaForCausalLM, rope_inv_freq
from tests.conftest import assert_close, hf_tensors

TOL = 1e-4
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4)
VARIANTS = {
    "mha": (tf.LlamaConfig, dict(num_key_value_heads=4)),
    "gqa": (tf.LlamaConfig, dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0)),
    "tied": (tf.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3_rope": (tf.LlamaConfig, dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear_rope": (tf.LlamaConfig, dict(num_key_value_heads=4, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "qwen2_qkv_bias": (tf.Qwen2Config, dict(num_key_value_heads=2)),
    "attention_bias": (tf.LlamaConfig, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "head_dim": (tf.LlamaConfig, dict(num_key_value_heads=2, head_dim=32)),
}


def build(name, tmp_path, **run):
  config_cls, extra = VARIANTS[name]
  hf_cfg = config_cls(**BASE, **extra)
  torch_model = tf.AutoModelForCausalLM.from_config(hf_cfg).eval()
  with torch.no_grad():  # random biases, so a missing bias would show
    for n, p in torch_model.named_parameters():
      if n.endswith("bias"):
        p.normal_(0, 0.1)
  return torch_model, jax_model(torch_model, tmp_path, **run)


def jax_model(torch_model, tmp_path, **run):
  tensors = hf_tensors(torch_model, tmp_path)
  model = LlamaForCausalLM(llama_config_from_hf(torch_model.config.to_dict(), **run), rngs=nnx.Rngs(0))
  load_tensors(model, tensors.items(), keymaps("llama"))
  return model


def jax_model_copy(model):
  """A second module over the same arrays (unstack_layers changes the module it is given)."""
  return nnx.merge(*nnx.split(model))


def torch_logits(torch_model, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else dict(attention_mask=torch.tensor(mask))
    return torch_model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(name, tmp_path):
  torch_model, model = build(name, tmp_path)
  ids = np.random.RandomState(1).randint(0, BASE["vocab_size"], (2, 24))
  ref = torch_logits(torch_model, ids)
  out = np.asarray(model(jnp.asarray(ids))[0])
  assert_close(out, ref, atol=TOL)


@pytest.mark.parametrize("hidden, heads, rope", [
    # Llama 3.1 8B's head_dim and scaling; Llama 3.2's factor 32; other factors and bounds.
    (4096, 32, dict(rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)),
    (2048, 32, dict(rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)),
    (64, 2, dict(rope_theta=10000.0, factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                 original_max_position_embeddings=256)),
])
def test_llama3_rope_frequencies_match_transformers(hidden, heads, rope):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf_cfg = tf.LlamaConfig(hidden_size=hidden, num_attention_heads=heads, rope_parameters=dict(rope_type="llama3", **rope))
  ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
  ours = np.asarray(rope_inv_freq(llama_config_from_hf(hf_cfg.to_dict())))
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=0)
  # Every band is checked: divided by the factor, blended, and left as it was.
  plain = 1.0 / rope["rope_theta"] ** (np.arange(0, hidden // heads, 2) / (hidden // heads))
  ratio = plain / ours
  assert np.isclose(ratio, rope["factor"], rtol=1e-5).sum() >= 2 and np.isclose(ratio, 1, rtol=1e-5).sum() >= 2
  assert (~np.isclose(ratio, rope["factor"], rtol=1e-5) & ~np.isclose(ratio, 1, rtol=1e-5)).sum() >= 1


def test_scan_equals_unrolled(tmp_path):
  torch_model, scanned = build("gqa", tmp_path, scan_layers=True)
  unrolled = jax_model(torch_model, tmp_path, scan_layers=False)
  ids = jnp.asarray(np.random.RandomState(2).randint(0, 96, (2, 16)))
  assert_close(np.asarray(scanned(ids)[0]), np.asarray(unrolled(ids)[0]), atol=1e-6)


def test_padding_mask_matches_transformers(tmp_path):
  torch_model, model = build("gqa", tmp_path)
  ids = np.random.RandomState(3).randint(0, 96, (2, 12))
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding
  ref = torch_logits(torch_model, ids, mask)
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # what HF derives from the mask
  out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions))[0])
  assert_close(out[mask == 1], ref[mask == 1], atol=TOL)


@pytest.mark.parametrize("layout", ["scan", "unrolled", "unstacked"])
def test_kv_cache_decoding_equals_full_forward(layout, tmp_path):
  """"unstacked": layers with arrays of their own and a cache of a buffer per layer, as the Engine
  decodes on CPU (`unstack_layers`, `KVCache.unstack`)."""
  _, model = build("gqa", tmp_path, scan_layers=layout == "scan")
  ids = jnp.asarray(np.random.RandomState(4).randint(0, 96, (2, 14)))
  full = np.asarray(model(ids)[0])
  cache = model.init_cache(batch=2, max_len=20)
  if layout == "unstacked":
    model, cache = unstack_layers(model), cache.unstack()
    assert model.model.layers.unstacked and cache.unstacked and cache.max_len == 20
  logits, cache = model(ids[:, :8], cache=cache)  # prefill
  steps = [np.asarray(logits)]
  for t in range(8, 14):
    logits, cache = model(ids[:, t:t + 1], cache=cache)
    steps.append(np.asarray(logits))
  assert_close(np.concatenate(steps, axis=1), full, atol=TOL)
  assert int(cache.index) == 14
  assert cache.unstacked == (layout == "unstacked")


def test_unstacked_cache_with_rows_at_their_own_lengths(tmp_path):
  """index int32[B] into a cache of a buffer per layer: each row equals the full forward, and
  stacking the cache back gives the stacked path's cache."""
  _, model = build("gqa", tmp_path)
  ids = np.random.RandomState(5).randint(0, 96, (2, 12))
  full = np.asarray(model(jnp.asarray(ids))[0])
  lengths = np.array([5, 8])
  x = np.where(np.arange(8)[None] < lengths[:, None], ids[:, :8], 0)
  mask = jnp.asarray(np.arange(8)[None] < lengths[:, None])
  start = model.init_cache(2, 16).replace(index=jnp.zeros(2, jnp.int32))
  _, stacked = model(jnp.asarray(x), attention_mask=mask, cache=start)
  unstacked_model = unstack_layers(jax_model_copy(model))
  _, cache = unstacked_model(jnp.asarray(x), attention_mask=mask, cache=start.unstack())
  np.testing.assert_allclose(np.asarray(cache.stack().k), np.asarray(stacked.k), rtol=1e-6, atol=1e-6)
  cache = cache.replace(index=jnp.asarray(lengths, jnp.int32))
  for k in range(3):
    out, cache = unstacked_model(jnp.asarray(ids[np.arange(2), lengths + k])[:, None], cache=cache)
    for b, n in enumerate(lengths):
      assert_close(np.asarray(out[b, 0]), full[b, n + k], atol=TOL)


def test_writing_past_the_end_of_the_kv_cache_raises(tmp_path):
  """dynamic_update_slice clamps its start: without the check the last slots were overwritten."""
  _, model = build("gqa", tmp_path)
  ids = jnp.asarray(np.random.RandomState(4).randint(0, 96, (2, 6)))
  _, cache = model(ids[:, :4], cache=model.init_cache(batch=2, max_len=5))
  _, cache = model(ids[:, 4:5], cache=cache)  # the last slot: fine
  with pytest.raises(UserError, match="KV cache overflow: 1 tokens at slot 5 do not fit its 5 slots"):
    model(ids[:, 5:6], cache=cache)


def test_shape_mismatch_names_the_tensor(tmp_path):
  torch_model, model = build("mha", tmp_path)
  tensors = hf_tensors(torch_model, tmp_path)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    load_tensors(model, tensors.items(), keymaps("llama"))
