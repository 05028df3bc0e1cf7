"""The sampled CTC softmax (config.train.ctc_negatives): the batch's transcript tokens and N random
others as classes. Checked against the whole-vocab CTC it stands in for."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llasm_jax.models.llasm import LLASM_PRESETS, Llasm
from llasm_jax.train import losses

CFG = LLASM_PRESETS["tiny_encoder"].replace(ctc=True)  # vocab 256
LABELS = jnp.array([[5, 3, 3, 9, 0, 0], [7, 2, 40, 41, 200, 0], [11, 0, 0, 0, 0, 0]])
LENGTHS = jnp.array([4, 5, 1])


def _embeds(model, frames=12):
  x = jax.random.normal(jax.random.key(1), (3, frames, CFG.llm.hidden_size)) * 0.5
  return x + model.llm.model.embed_tokens.embedding[...][LABELS[:, :1]]  # some signal toward each row's first token


def _loss(model, negatives=0, key=jax.random.key(0)):
  embeds = _embeds(model)
  valid = jnp.ones(embeds.shape[:2], bool)
  feasible = losses.ctc_feasible(LABELS, LENGTHS, jnp.full((3,), embeds.shape[1]))
  labels, classes, class_valid = LABELS, None, None
  if negatives:
    classes, class_valid, labels = losses.ctc_classes(LABELS, LENGTHS, key, negatives, CFG.llm.vocab_size)
  logits = model.ctc_logits(embeds, classes, class_valid)
  n = jnp.where(feasible, LENGTHS, 0)
  paddings = (jnp.arange(LABELS.shape[1])[None, :] >= n[:, None]).astype(jnp.float32)
  return optax.ctc_loss(logits, 1.0 - valid, labels, paddings, blank_id=logits.shape[-1] - 1), classes, class_valid


def test_classes_hold_every_target_once_and_remap_the_labels():
  classes, valid, index = losses.ctc_classes(LABELS, LENGTHS, jax.random.key(3), 64, CFG.llm.vocab_size)
  kept = np.asarray(classes)[np.asarray(valid)]
  assert len(kept) == len(set(kept.tolist()))  # no class twice: a duplicate would count twice in the softmax
  for row, n in zip(np.asarray(LABELS), np.asarray(LENGTHS)):
    assert set(row[:n].tolist()) <= set(kept.tolist())
  got = np.asarray(classes)[np.asarray(index)]
  for r, n in enumerate(np.asarray(LENGTHS)):
    np.testing.assert_array_equal(got[r, :n], np.asarray(LABELS)[r, :n])


def test_equals_the_whole_vocab_when_the_samples_cover_it():
  model = Llasm(CFG, rngs=nnx.Rngs(0))
  full, _, _ = _loss(model)
  sampled, classes, valid = _loss(model, negatives=8 * CFG.llm.vocab_size)
  assert set(np.asarray(classes)[np.asarray(valid)].tolist()) == set(range(CFG.llm.vocab_size))
  np.testing.assert_allclose(sampled, full, rtol=1e-5)


def test_fewer_classes_never_cost_more_and_train_finitely():
  model = Llasm(CFG, rngs=nnx.Rngs(0))
  full, _, _ = _loss(model)
  sampled, _, _ = _loss(model, negatives=16)
  assert np.all(np.isfinite(sampled)) and np.all(sampled <= full + 1e-4)
  assert np.any(sampled < full - 1e-3)  # fewer competitors: a higher probability of the transcript
  grads = jax.grad(lambda m: _loss(m, negatives=16)[0].sum())(model)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))
