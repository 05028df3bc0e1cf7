"""Modal adaptors: Whisper states -> LLM embeddings.

Legend: B batch, T Whisper frames, E Whisper width, k stacking factor, D LLM width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llasm_jax.layers import dense


class LinearAdaptor(nnx.Module):
  """LLaSM's released adaptor: one Linear(E -> D) with bias, per position (`mm_projector`)."""

  def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.mm_projector = dense(in_features, out_features, ("audio_embed", "embed"), use_bias=True,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float[B, T, E], valid int[B] -> float[B, T, D], valid int[B]."""
    return self.mm_projector(x), frames


class StackedMLPAdaptor(nnx.Module):
  """Encoder-mode adaptor: stack k consecutive frames, then Linear -> GELU -> Linear.

  T frames become ceil(T / k) tokens (8 -> 6.25 tokens per second of audio); the last
  group is zero-padded, as is the frame axis of a shorter audio in a batch.
  """

  def __init__(self, in_features: int, out_features: int, stack_factor: int, hidden: int | None = None,
               *, dtype, param_dtype, rngs: nnx.Rngs):
    hidden = hidden or out_features
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stack_factor = stack_factor
    self.linear_1 = dense(in_features * stack_factor, hidden, ("audio_embed", "mlp"), **kw)
    self.linear_2 = dense(hidden, out_features, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float[B, T, E], valid frames int[B] -> float[B, ceil(T/k), D], valid tokens int[B]."""
    k = self.stack_factor
    b, t, e = x.shape
    x = jnp.where((jnp.arange(t)[None, :] < frames[:, None])[..., None], x, 0)
    x = jnp.pad(x, ((0, 0), (0, -t % k), (0, 0))).reshape(b, -1, k * e)
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False)), -(-frames // k)
