"""A KV cache whose rows sit at their own lengths (index int32[B]): each row equals the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llasm_jax.models.llama import LLAMA_PRESETS, LlamaForCausalLM


def test_rows_at_their_own_lengths_match_the_full_forward():
  model = LlamaForCausalLM(LLAMA_PRESETS["tiny"], rngs=nnx.Rngs(0))
  ids = np.random.RandomState(0).randint(0, 256, (2, 12))
  full, _ = model(jnp.asarray(ids))
  # Row 0 holds 5 prompt tokens, row 1 holds 8, right-padded into one prefill.
  lengths = np.array([5, 8])
  x = np.zeros((2, 8), np.int32)
  mask = np.arange(8)[None] < lengths[:, None]
  x[mask] = ids[:, :8][mask]
  cache = model.init_cache(2, 32)
  cache = cache.replace(index=jnp.zeros(2, jnp.int32))
  assert cache.per_row
  out, cache = model(jnp.asarray(x), attention_mask=jnp.asarray(mask), cache=cache)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(out[b, :n], full[b, :n], rtol=1e-5, atol=1e-5)
  cache = cache.replace(index=jnp.asarray(lengths, jnp.int32))  # the padding slots get overwritten
  step = jax.jit(lambda m, tok, c: m(tok, cache=c))
  for k in range(3):
    out, cache = step(model, jnp.asarray(ids[np.arange(2), lengths + k])[:, None], cache)
    for b, n in enumerate(lengths):
      np.testing.assert_allclose(out[b, 0], full[b, n + k], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.index, lengths + 3)
