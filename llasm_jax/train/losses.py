"""Token losses over the positions that carry a target: cross-entropy and distillation KL.

Legend: B batch, T length, K target slots per row (static), D width, V vocab.

Labels follow the HF convention (unshifted, -100 = no loss): the logits at position t predict
labels[t + 1]. The batch's `target_positions` (llasm_jax/data/pipeline.py) list, per row, the
positions whose next token is a target; the LM head runs on those K slots only instead of all
T (in stage 1 about one position in eight carries a loss, and the head of a small LLM is a
fifth of its matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE = -100


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
