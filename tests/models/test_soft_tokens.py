"""Soft tokens (LegoSLM, `Llasm.soft_tokens`): the LLM reads each audio slot's CTC hypothesis as soft text.
Checked against a numpy greedy CTC collapse of the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llasm_jax.models.llasm import LLASM_PRESETS, Llasm

CFG = LLASM_PRESETS["tiny_encoder"].replace(ctc=True, soft_tokens=True)


def _reference(model, outputs, valid):
  """numpy: greedy CTC collapse per row, kept frames' posterior-weighted embeddings at the end of the
  row's valid frames, the filler before them."""
  v = CFG.llm.vocab_size
  logits = np.asarray(model.ctc_logits(outputs), np.float64)
  table = np.asarray(model.llm.model.embed_tokens.embedding[...][:v], np.float64)
  filler = np.asarray(model.ctc_blank.embedding[...], np.float64)
  out = np.zeros(outputs.shape)
  for r in range(outputs.shape[0]):
    n = int(valid[r].sum())
    best = logits[r, :n].argmax(-1)
    kept = [t for t in range(n) if best[t] != v and (t == 0 or best[t] != best[t - 1])]
    z = logits[r, :, :v] - logits[r, :, :v].max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    out[r, :n - len(kept)] = filler
    for j, t in enumerate(kept):
      out[r, n - len(kept) + j] = probs[t] @ table
  return out


def test_collapsed_hypothesis_at_the_end_of_each_slot():
  model = Llasm(CFG, rngs=nnx.Rngs(0))
  table = model.llm.model.embed_tokens.embedding[...]
  model.ctc_blank.embedding[...] = jax.random.normal(jax.random.key(2), table.shape[1:])
  model.ctc_blank.bias[...] = jnp.array(2.0)
  # Row 0: token 5 twice (one kept), a blank, token 9, then noise; row 1: padding after 4 frames.
  e = lambda i: table[i] * 5000.0
  zero = jnp.zeros(table.shape[1])
  noise = jax.random.normal(jax.random.key(1), (2, 8, table.shape[1]))
  rows = jnp.stack([jnp.stack([e(5), e(5), zero, e(9), zero, e(5), *noise[0, :2]]),
                    jnp.stack([e(7), zero, e(7), e(3), *noise[1, :4]])])
  valid = jnp.array([[True] * 8, [True] * 4 + [False] * 4])
  got = np.asarray(model.soft_tokens(rows, valid))
  want = _reference(model, rows, np.asarray(valid))
  for r, n in enumerate((8, 4)):
    np.testing.assert_allclose(got[r, :n], want[r, :n], rtol=1e-4, atol=1e-5)
  # The confident frames read as the tokens' own embeddings: row 1 is "7 7 3" after the filler.
  np.testing.assert_allclose(got[1, 1:4], np.asarray(table)[[7, 7, 3]], atol=1e-3)
  np.testing.assert_allclose(got[1, 0], np.asarray(model.ctc_blank.embedding[...]), atol=1e-6)


def test_adapt_gives_soft_tokens_unless_raw_and_gradients_reach_the_adaptor():
  model = Llasm(CFG, rngs=nnx.Rngs(0))
  features = jax.random.normal(jax.random.key(0), (2, 1, 40, CFG.audio.d_model))
  lengths = jnp.array([[40], [24]])
  soft, valid = model.adapt(features, lengths)
  raw, valid_raw = model.adapt(features, lengths, raw=True)
  np.testing.assert_array_equal(valid, valid_raw)
  np.testing.assert_allclose(soft, model.soft_tokens(raw[:, 0], valid[:, 0])[:, None], rtol=1e-6)
  assert not np.allclose(soft, raw)
  grads = nnx.grad(lambda m: jnp.sum(m.adapt(features, lengths)[0] ** 2))(model)
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(nnx.state(grads.adaptor, nnx.Param)))
