"""Modal adaptors: Whisper states -> LLM embeddings.

Legend: B batch, T Whisper frames, E Whisper width, k stacking factor, H adaptor width, D LLM width,
V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llasm_jax.errors import UserError
from llasm_jax.layers import RMSNorm, dense, param_init

# Ultravox's RMSNorm epsilon (its projector subclasses transformers' LlamaRMSNorm with eps 1e-6).
ULTRAVOX_NORM_EPS = 1e-6


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
    x, tokens = stack_frames(x, frames, self.stack_factor)
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False)), tokens


# TranscriptAdaptor: the MLP's output enters at this scale. Adam moves each of its zero-started
# output weights by about the learning rate per step, so over a 2048-wide hidden layer one step at
# 2e-3 could move an output by ~1 per width, 10x a text row's 0.12: measured, the demo's loss rose
# from 2.1 untrained to 3.0 within 20 steps. At 0.01 a step moves it by a tenth of the text at most.
RESIDUAL_SCALE = 0.01


class TranscriptAdaptor(nnx.Module):
  """"decoder"-mode adaptor. Each feature is a Whisper decoder state h beside the LLM embedding t of
  the token Whisper read there (`Llasm.encode_audio`); the output is t + 0.01 MLP(h / rms(h)), the MLP's last layer
  starting at zero, so an untrained adaptor hands the LLM Whisper's transcript as its own text
  embeddings and training learns what the states add. The P outputs of an audio hold its n
  transcript tokens last, in order, and a learned filler before them (`convert` starts it at the
  LLM's embedding of a space, which the LLM reads past; zero vectors derail it)."""

  def __init__(self, in_features: int, out_features: int, hidden: int | None = None, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.mlp = StackedMLPAdaptor(in_features, out_features, 1, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kernel = self.mlp.linear_2.kernel
    kernel[...] = jnp.zeros(kernel.shape, kernel.dtype)
    zeros = param_init(nnx.initializers.zeros_init(), ("embed",))
    self.filler = nnx.Param(zeros(jax.random.key(0), (out_features,), param_dtype))
    self.in_features = in_features

  def __call__(self, x: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float[B, P, E + D], transcript tokens int[B] (0: an empty slot) -> float[B, P, D] and its valid
    tokens int[B]: all P of a filled slot."""
    p = x.shape[1]
    states, text = x[..., :self.in_features], x[..., self.in_features:]
    # Whisper's final decoder states have a norm near 200 (the text rows: 3). Unnormalised, a few
    # hundred steps at the adaptor's learning rate grew the residual to 100x the text it adds to
    # (the demo fell from 74% WER untrained to 96% trained); at unit RMS it stays a correction.
    states = states * jax.lax.rsqrt(jnp.mean(jnp.square(states.astype(jnp.float32)), -1, keepdims=True) + 1e-6)
    residual = RESIDUAL_SCALE * self.mlp(states, frames)[0]
    out = text.astype(residual.dtype) + residual
    source = jnp.arange(p)[None, :] - (p - frames[:, None])  # place j shows token j - (P - n)
    shown = jnp.take_along_axis(out, jnp.maximum(source, 0)[..., None], axis=1)
    out = jnp.where((source >= 0)[..., None], shown, self.filler[...].astype(shown.dtype))
    return out, jnp.where(frames > 0, p, 0)


class UltravoxAdaptor(nnx.Module):
  """Ultravox's projector (fixie-ai/ultravox `UltravoxProjector`, v0.4 layout): stack k frames,
  then ln_pre RMSNorm(k*E) -> linear_1 (k*E -> H) -> SwiGLU (H -> H/2) -> linear_2 (H/2 -> D) ->
  ln_post RMSNorm(D). No biases, as in Ultravox.

  The norm at each end makes the output size a parameter: ln_post's scale starts at the per-width
  RMS of the LLM's text embeddings (`text_scale`, set by `Llasm.match_text_scale` and `convert`),
  so audio embeddings enter the LLM at the size of the text around them, whatever Whisper's
  scale; without it a random adaptor's outputs can be orders of magnitude off.
  """

  def __init__(self, in_features: int, out_features: int, stack_factor: int, hidden: int | None = None,
               *, dtype, param_dtype, rngs: nnx.Rngs):
    hidden = hidden or out_features
    if hidden % 2:
      raise UserError(f"adaptor_hidden {hidden}: the Ultravox adaptor's SwiGLU halves its width; use an even width")
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stack_factor = stack_factor
    self.ln_pre = RMSNorm(in_features * stack_factor, ULTRAVOX_NORM_EPS, **norm)
    # RMSNorm names its scale "embed"; this one spans the stacked Whisper width, named like
    # linear_1's input so that a rules table places the two alike.
    self.ln_pre.weight = nnx.Param(param_init(nnx.initializers.ones_init(), ("audio_embed",))(
        None, (in_features * stack_factor,), param_dtype))
    self.linear_1 = dense(in_features * stack_factor, hidden, ("audio_embed", "mlp"), **kw)
    self.linear_2 = dense(hidden // 2, out_features, ("mlp", "embed"), **kw)
    self.ln_post = RMSNorm(out_features, ULTRAVOX_NORM_EPS, **norm)

  def __call__(self, x: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float[B, T, E], valid frames int[B] -> float[B, ceil(T/k), D], valid tokens int[B]."""
    x, tokens = stack_frames(x, frames, self.stack_factor)
    h = self.linear_1(self.ln_pre(x))
    # Ultravox's SwiGLU: the first half is the value, the second the gate.
    value, gate = jnp.split(h, 2, axis=-1)
    return self.ln_post(self.linear_2(jax.nn.silu(gate) * value)), tokens


def stack_frames(x: jax.Array, frames: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """float[B, T, E], valid frames int[B] -> float[B, ceil(T/k), k*E], tokens int[B].

  Frames past each audio's length are zeroed first, so a shorter audio in a batch stacks
  as it would alone; the last group is zero-padded."""
  b, t, e = x.shape
  x = jnp.where((jnp.arange(t)[None, :] < frames[:, None])[..., None], x, 0)
  return jnp.pad(x, ((0, 0), (0, -t % k), (0, 0))).reshape(b, -1, k * e), -(-frames // k)


def text_scale(table, vocab_size: int | None = None, rows_per_chunk: int = 16384) -> jax.Array:
  """float[V, D] embedding table -> float32[D]: the RMS of each width over the first `vocab_size`
  rows (all by default; padding rows left out), the Ultravox adaptor's ln_post scale at the start.

  Takes a host array (numpy, at conversion) or a traced one; summed a chunk of rows at a time so
  that an 8B model's table is never copied whole in float32."""
  n = table.shape[0] if vocab_size is None else vocab_size
  total = jnp.zeros((table.shape[1],), jnp.float32)
  for i in range(0, n, rows_per_chunk):
    rows = jnp.asarray(table[i:min(i + rows_per_chunk, n)], jnp.float32)
    total = total + jnp.sum(rows * rows, axis=0)
  return jnp.sqrt(total / n)
