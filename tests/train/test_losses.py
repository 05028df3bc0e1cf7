"""Losses on target slots against plain references: full-logit cross-entropy (optax over every
position) and a KL written out by hand in numpy."""

import jax.numpy as jnp
import numpy as np
import optax

from llasm_jax.data.contract import target_positions
from llasm_jax.train import losses

from llasm_jax.tokens import IGNORE


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
  pos = target_positions(labels)
  assert pos.shape == (3, 8)  # 5 targets at most -> K = 8 (powers of two, at least 8)
  assert pos[0, :5].tolist() == [3, 4, 5, 6, -1] and (pos >= 0).sum(1).tolist() == [4, 5, 0]
  valid = jnp.asarray(pos >= 0)
  tgt = jnp.asarray(np.take_along_axis(labels, np.maximum(pos, 0) + 1, axis=1))
  assert np.asarray(tgt)[1, :5].tolist() == [9, 1, 2, 3, 4]
  pos = jnp.asarray(np.maximum(pos, 0))
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


def test_the_step_on_target_slots_equals_the_full_logit_loss():
  """The train step runs the LM head on the batch's K target slots; the plain path it replaces
  (logits at every position, shifted labels masked) gives the same loss, and K = T gives the same
  updated parameters as a bucketed K < T."""
  import jax
  from flax import nnx

  from llasm_jax.models.llasm import Llasm
  from llasm_jax.train.setup import prepare
  from llasm_jax.train.step import TrainState, make_train_step
  from llasm_jax.train.synthetic import synthetic_dataset
  from tests.train.test_train import tiny_config

  config = tiny_config(stage=2)
  setup = prepare(config)
  host = next(iter(synthetic_dataset(setup.cfg, config.data, seed=0, host_batch=4, process_index=0,
                                     process_count=1)))
  t = host["labels"].shape[1]
  assert host["target_positions"].shape == (4, t)
  bucketed = dict(host, target_positions=target_positions(host["labels"]))
  assert bucketed["target_positions"].shape[1] < t
  _, params, rest = nnx.split(Llasm(setup.cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.labels, grad_accum=1))

  def run(batch):
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=setup.tx.init(params),
                       rng=jnp.zeros((2,), jnp.uint32))
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(metrics["loss"]), jax.tree.leaves(new.params)

  full_loss, full_params = run(host)
  slot_loss, slot_params = run(bucketed)
  model = nnx.merge(setup.graphdef, params, rest)
  logits, _ = model(jnp.asarray(host["input_ids"]), jnp.asarray(host["mel"]), jnp.asarray(host["mel_lengths"]),
                    attention_mask=jnp.asarray(host["attention_mask"]), positions=jnp.asarray(host["positions"]))
  labels = host["labels"]
  mask = labels[:, 1:] != IGNORE
  plain = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(np.where(mask, labels[:, 1:], 0)))
  want = float(jnp.sum(plain * mask)) / mask.sum()
  np.testing.assert_allclose([full_loss, slot_loss], [want, want], rtol=1e-6)
  for a, b in zip(full_params, slot_params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
