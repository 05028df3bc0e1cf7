"""Target-slot losses against plain references: full-logit cross-entropy (optax over every
position) and a KL written out by hand in numpy."""

import jax.numpy as jnp
import numpy as np
import optax

from llasm_jax.train import losses

IGNORE = losses.IGNORE


def _labels():
  labels = np.full((3, 10), IGNORE, np.int32)
  labels[0, 4:8] = [5, 6, 7, 8]
  labels[1, 1:3] = [9, 1]
  labels[1, 7:10] = [2, 3, 4]  # two answers in one row (multi-turn)
  return labels  # row 2 has no target at all


def test_slots_and_cross_entropy_equal_the_full_logit_loss():
  rng = np.random.default_rng(0)
  labels = _labels()
  logits = rng.standard_normal((3, 10, 11)).astype(np.float32)
  k = losses.max_targets(labels)
  assert k == 5
  pos, tgt, valid = losses.target_slots(jnp.asarray(labels), k)
  assert np.asarray(pos)[0, :4].tolist() == [3, 4, 5, 6] and np.asarray(valid).sum(1).tolist() == [4, 5, 0]
  assert np.asarray(tgt)[1, :5].tolist() == [9, 1, 2, 3, 4]
  got, count = losses.cross_entropy(losses.gather(jnp.asarray(logits), pos), tgt, valid)
  # The plain path: every position's logits, shifted labels, masked.
  mask = labels[:, 1:] != IGNORE
  full = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits[:, :-1]),
                                                          jnp.asarray(np.where(mask, labels[:, 1:], 0)))
  np.testing.assert_allclose(float(got), float(jnp.sum(full * mask)), rtol=1e-6)
  assert float(count) == mask.sum() == 9


def test_distillation_kl_equals_a_hand_written_kl():
  rng = np.random.default_rng(1)
  s = rng.standard_normal((2, 4, 7)).astype(np.float32)
  t = rng.standard_normal((2, 4, 7)).astype(np.float32)
  valid = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  for temp in (1.0, 2.0):
    p, q = softmax(t.astype(np.float64) / temp), softmax(s.astype(np.float64) / temp)
    want = (np.sum(p * (np.log(p) - np.log(q)), axis=-1) * valid).sum() * temp ** 2
    got = losses.distillation_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(valid), temperature=temp)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(losses.distillation_kl(jnp.asarray(t), jnp.asarray(t), jnp.asarray(valid))) < 1e-6
