"""Token losses over the positions that carry a target: cross-entropy and distillation KL.

Legend: B batch, T length, K target slots per row (static), D width, V vocab.

Labels follow the HF convention (unshifted, -100 = no loss): the logits at position t predict
labels[t + 1]. `target_slots` lists, per row, the positions whose next token is a target, in
order; the LM head then runs on those K positions only instead of all T (in stage 1 about one
position in eight carries a loss, and the head of a small LLM is a fifth of its matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

IGNORE = -100


def target_slots(labels: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """labels int[B, T] -> (positions int32[B, K], next-token targets int32[B, K], valid bool[B, K]).

  Row b's i-th slot is its i-th position t (in order) with labels[b, t + 1] != IGNORE; rows with
  fewer than K such positions are padded (valid False), rows with more lose their last ones
  (the caller picks K >= the most targets of any row, see `max_targets`).
  """
  b, t = labels.shape
  has_target = jnp.concatenate([labels[:, 1:] != IGNORE, jnp.zeros((b, 1), bool)], axis=1)
  # Target positions first, in order (stable), then the rest.
  order = jnp.argsort(~has_target, axis=1, stable=True)[:, :k].astype(jnp.int32)
  valid = jnp.take_along_axis(has_target, order, axis=1)
  nxt = jnp.take_along_axis(labels, jnp.minimum(order + 1, t - 1), axis=1)
  return order, jnp.where(valid, nxt, 0), valid


def max_targets(labels) -> int:
  """The most target tokens of any row of host labels int[B, T] (K for `target_slots`)."""
  labels = np.asarray(labels)
  return int(np.max(np.sum(labels[:, 1:] != IGNORE, axis=1), initial=0))


def gather(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x float[B, T, D], positions int[B, K] -> float[B, K, D]."""
  return jnp.take_along_axis(x, positions[..., None], axis=1)


def cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits float[B, K, V], targets int[B, K], valid bool[B, K] -> (summed CE, target count), float32."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid).astype(jnp.float32)


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, valid: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
  """Summed KL(teacher || student) between next-token distributions, float32 scalar.

  student_logits, teacher_logits float[B, K, V] at matching target slots (the i-th response
  token of a row in both); valid bool[B, K]. The teacher is constant (no gradient reaches it).
  Scaled by temperature^2 so gradients keep their size across temperatures (Hinton et al.).
  """
  t = temperature
  teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return jnp.sum(jnp.where(valid, kl, 0.0)) * t * t
