"""Next-token choice from logits: greedy, or temperature sampling with top-k and top-p filters.

Legend: B batch, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llasm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each token. temperature <= 0 is greedy (argmax); top_k <= 0 and top_p >= 1
  switch those filters off. The same seed gives the same tokens for the same inputs."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"top_p {self.top_p}: expected a value in (0, 1]")
    if self.temperature < 0:
      raise UserError(f"temperature {self.temperature}: expected >= 0 (0 = greedy)")

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0

  def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(temperature float32[], top_k int32[], top_p float32[]): traced, so changing them
    never recompiles."""
    return (jnp.float32(max(self.temperature, 1e-6)), jnp.int32(max(self.top_k, 0)), jnp.float32(self.top_p))


def sample(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           *, greedy: bool) -> jax.Array:
  """float32[B, V] -> int32[B].

  `greedy` is static: the greedy path skips the vocab sort that the filters need. The filters
  keep every token whose logit reaches both thresholds (ties at a threshold are all kept):
  the k-th largest logit, and the smallest logit of the shortest prefix of the sorted
  distribution whose probability mass reaches top_p (so the most likely token always stays).
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  ordered = -jnp.sort(-logits, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jax.lax.dynamic_index_in_dim(ordered, k - 1, axis=-1, keepdims=True)
  probs = jax.nn.softmax(ordered, axis=-1)
  # Mass strictly before each token < top_p: that token is still needed to reach top_p.
  before = jnp.cumsum(probs, axis=-1) - probs
  nucleus = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
  keep = logits >= jnp.maximum(kth, nucleus)
  return jax.random.categorical(rng, jnp.where(keep, logits, -jnp.inf), axis=-1).astype(jnp.int32)
