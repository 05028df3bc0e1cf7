"""Attention core, masks and the preallocated KV cache shared by Whisper and LLaMA.

Legend: B batch, T query length, S key length (cache slots), N query heads, K kv heads,
H head dim, L layers.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from llasm_jax.errors import UserError


@flax.struct.dataclass
class KVCache:
  """Preallocated keys/values of every layer, written in place as decoding advances.

  k, v:  float[L, B, S, K, H]
  mask:  bool[B, S]   slots that hold a real (non-padding) token
  index: int32[]      next slot to write, the same for every row (prompts left-padded, rows step
                      together: `Engine.generate`), or
         int32[B]     each row's own next slot (decode slots that hold different requests, each at
                      its own length: `infer.batching`)
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype):
    shape = (num_layers, batch, max_len, kv_heads, head_dim)
    return cls(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def per_row(self) -> bool:
    """Whether every row has its own write slot (index int32[B])."""
    return self.index.ndim == 1


def causal_mask(key_valid: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """bool[B, 1, T, T]: causal and key padding mask for a full (uncached) forward.

  segment_ids int[B, T] (packed rows: 1..n per sample, 0 = padding): a query sees only keys of its
  own segment, so the mask is block-diagonal causal. Padding queries (segment 0) keep the plain
  causal view: no query row is fully masked (NaN under some attention kernels), and what they
  compute is never read."""
  t = key_valid.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  mask = causal[None, None] & key_valid[:, None, None, :].astype(bool)
  if segment_ids is not None:
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) | (segment_ids[:, :, None] == 0)
    mask = mask & same[:, None]
  return mask


def cached_mask(cache: KVCache, key_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mask for T new tokens written at `cache.index`: (bool[B, 1, T, S], new slot mask bool[B, S]).

  Writing past the last slot is an error: dynamic_update_slice would clamp the start and silently
  overwrite the last slots. The index is checked whenever it is known on the host (eager calls);
  inside a jitted loop the caller sizes the cache (the Engine allocates prompt + new tokens)."""
  t = key_valid.shape[1]
  try:
    index = int(jnp.max(cache.index))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):  # traced: under jit
    index = None
  if index is not None and index + t > cache.max_len:
    raise UserError(f"KV cache overflow: {t} tokens at slot {index} do not fit its {cache.max_len} slots; "
                     "allocate a longer cache (init_cache(batch, max_len))")
  starts = cache.index if cache.per_row else jnp.broadcast_to(cache.index, key_valid.shape[:1])
  slot_mask = jax.vmap(lambda m, v, i: jax.lax.dynamic_update_slice(m, v, (i,)))(
      cache.mask, key_valid.astype(bool), starts)
  q_slot = starts[:, None] + jnp.arange(t)  # [B, T]
  causal = jnp.arange(cache.max_len)[None, None, :] <= q_slot[:, :, None]  # [B, T, S]
  return causal[:, None] & slot_mask[:, None, None, :], slot_mask


def write_kv(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array):
  """Writes k, v float[B, T, K, H] into one layer's cache float[B, S, K, H] at slot `index`."""
  cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
  cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
  return cache_k, cache_v


def write_kv_stacked(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, layer, index):
  """Writes k, v float[B, T, K, H] into layer `layer` of the stacked caches float[L, B, S, K, H] at
  slot `index` (int32[], or int32[B]: each row at its own slot): returns the updated stacks and
  that layer's k, v float[B, S, K, H].

  The write goes into the whole stack (a scan carry, so XLA updates it in place) and the
  layer's slice is read after it, so nothing but the T new slots is written.
  """
  if index.ndim == 0:
    def write(cache, x):
      return jax.lax.dynamic_update_slice(cache, x[None].astype(cache.dtype), (layer, 0, index, 0, 0))
  else:
    @functools.partial(jax.vmap, in_axes=(1, 0, 0), out_axes=1)  # over rows: one scatter of T slots each
    def write_row(cache, x, i):  # float[L, S, K, H], float[T, K, H], int32[]
      return jax.lax.dynamic_update_slice(cache, x[None].astype(cache.dtype), (layer, i, 0, 0))

    def write(cache, x):
      return write_row(cache, x, index)
  cache_k, cache_v = write(cache_k, k), write(cache_v, v)
  layer_kv = (jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False),
              jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False))
  return (cache_k, cache_v), layer_kv


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float | None = None,
    implementation: Literal["xla", "cudnn"] | None = None,
) -> jax.Array:
  """Softmax attention, 'BTNH,BSKH->BTNH' with N a multiple of K (grouped-query attention).

  Goes through `jax.nn.dot_product_attention` so XLA, cuDNN flash attention (GPU) or a TPU
  kernel can serve it without touching the models.
  """
  return jax.nn.dot_product_attention(
      q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale, implementation=implementation)
