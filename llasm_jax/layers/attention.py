"""Attention core, masks and the preallocated KV cache shared by Whisper and LLaMA.

Legend: B batch, T query length, S key length (cache slots), N query heads, K kv heads,
H head dim, L layers.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp

from llasm_jax.errors import UserError


@flax.struct.dataclass
class KVCache:
  """Preallocated keys/values of every layer, written in place as decoding advances.

  k, v:  float[L, B, K, S, H]   heads before slots: a layer's float[B, K, S, H] is what the
                               attention products read (batch B, K; contract H, then S)
                               without a transposing copy of the cache at every step
  mask:  bool[B, S]   slots that hold a real (non-padding) token
  index: int32[]      next slot to write, the same for every row (prompts left-padded, rows step
                      together: `Engine.generate`), or
         int32[B]     each row's own next slot (decode slots that hold different requests, each at
                      its own length: `infer.batching`)

  With layers that run unrolled from arrays of their own (`layers.stack.unstack_layers`, as the
  Engine decodes on XLA:CPU), k and v may be tuples of L arrays float[B, K, S, H] instead
  (`unstack`, `stack`).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array

  # The logical axis names of the arrays (`sharding.logical_spec` maps them to mesh axes): k and v
  # stacked (one layer's: without "layers"), and the mask.
  KV_AXES = ("layers", "batch", "act_kv_heads", "length", "head_dim")
  MASK_AXES = ("batch", "length")

  @classmethod
  def logical_axes(cls, num_layers: int, *, unstacked: bool = False, per_row: bool = False,
                   fn: Callable[[tuple[str, ...]], Any] = lambda axes: axes) -> "KVCache":
    """A KVCache whose every array is `fn(its logical axis names)` (by default the names): k, v
    `KV_AXES`, or L times `KV_AXES[1:]` `unstacked`; mask `MASK_AXES`; index () or, `per_row`,
    ("batch",). With `fn` mapping names to shardings, the shardings of a cache."""
    kv = (fn(cls.KV_AXES[1:]),) * num_layers if unstacked else fn(cls.KV_AXES)
    return cls(k=kv, v=kv, mask=fn(cls.MASK_AXES), index=fn(("batch",) if per_row else ()))

  @classmethod
  def zeros(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype):
    shape = (num_layers, batch, kv_heads, max_len, head_dim)
    return cls(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return (self.k[0] if self.unstacked else self.k).shape[-2]

  @property
  def unstacked(self) -> bool:
    """Whether k, v are tuples of L arrays float[B, K, S, H] (`unstack`) rather than one stack each."""
    return isinstance(self.k, tuple)

  def unstack(self) -> "KVCache":
    """k, v as tuples of L arrays float[B, K, S, H], a buffer per layer (a copy), for a decode loop
    whose layers run unrolled (`layers.stack.unstack_layers`): each layer then reads and writes its
    own buffer in place, where XLA:CPU would copy a layer's slice of the stack at every step."""
    if self.unstacked:
      return self
    return self.replace(k=tuple(self.k), v=tuple(self.v))

  def stack(self) -> "KVCache":
    """The inverse of `unstack`: k, v float[L, B, K, S, H]."""
    if not self.unstacked:
      return self
    return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))

  def put_rows(self, rows: jax.Array, new: "KVCache", lengths: jax.Array) -> "KVCache":
    """This per-row cache with rows `rows` int32[k] replaced by the k rows of `new`, a cache of
    T <= S slots holding prompts of `lengths` int32[k] from slot 0; rows >= B are dropped. Either
    cache may be stacked or one buffer per layer; the result has this cache's form."""
    t = new.max_len

    def put(dst, src):  # float[(L,) B, K, S, H] <- float[(L,) k, K, T, H]
      lead = (slice(None),) * (dst.ndim - 4)
      return dst.at[(*lead, rows, slice(None), slice(0, t))].set(src.astype(dst.dtype), mode="drop")

    if self.unstacked:
      new = new.unstack()
      k, v = tuple(map(put, self.k, new.k)), tuple(map(put, self.v, new.v))
    else:
      new = new.stack()
      k, v = put(self.k, new.k), put(self.v, new.v)
    mask = self.mask.at[rows].set(jnp.arange(self.max_len)[None] < lengths[:, None], mode="drop")
    return KVCache(k=k, v=v, mask=mask, index=self.index.at[rows].set(lengths, mode="drop"))

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


def write_kv_stacked(cache_k, cache_v, k: jax.Array, v: jax.Array, layer, index: jax.Array):
  """Writes k, v float[B, T, K, H] into layer `layer` of the stacked caches float[L, B, K, S, H] at
  slot `index` (int32[], or int32[B]: each row at its own slot): returns the updated stacks and
  that layer's k, v float[B, K, S, H].

  The write goes into the whole stack (a scan carry, so XLA updates it in place) and the
  layer's slice is read after it, so nothing but the T new slots is written. The caches may also
  be tuples of L arrays float[B, K, S, H] (`KVCache.unstack`; `layer` a Python int): the write
  then goes into that layer's array and the layer's k, v are that array, read without a copy.
  """
  per_layer = isinstance(cache_k, tuple)
  lead = () if per_layer else (layer,)  # the layer's start in a stack

  def write(cache, x):  # cache float[(L,) B, K, S, H], x float[B, T, K, H]
    x = jnp.swapaxes(x, 1, 2).astype(cache.dtype)  # [B, K, T, H]
    if index.ndim == 0:
      return jax.lax.dynamic_update_slice(cache, x.reshape((1,) * len(lead) + x.shape), (*lead, 0, 0, index, 0))

    @functools.partial(jax.vmap, in_axes=(len(lead), 0, 0), out_axes=len(lead))  # over rows: T slots each
    def write_row(c, xr, i):  # float[(L,) K, S, H], float[K, T, H], int32[]
      return jax.lax.dynamic_update_slice(c, xr.reshape((1,) * len(lead) + xr.shape), (*lead, 0, i, 0))

    return write_row(cache, x, index)

  if per_layer:
    layer_kv = write(cache_k[layer], k), write(cache_v[layer], v)
    replace = lambda stack, new: stack[:layer] + (new,) + stack[layer + 1:]
    return (replace(cache_k, layer_kv[0]), replace(cache_v, layer_kv[1])), layer_kv
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
    heads_first: bool = False,
) -> jax.Array:
  """Softmax attention, 'BTNH,BSKH->BTNH' with N a multiple of K (grouped-query attention);
  with `heads_first`, k and v are float[B, K, S, H] (a layer of a `KVCache`).

  Goes through `jax.nn.dot_product_attention` so XLA, cuDNN flash attention (GPU) or a TPU
  kernel can serve it without touching the models. (The heads-first operands are handed over
  transposed; XLA folds that into the products. Writing the products out for that layout here
  instead was no faster on XLA:CPU: it keeps its own operand layouts at batch 1 either way.)
  """
  if heads_first:
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  return jax.nn.dot_product_attention(
      q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale, implementation=implementation)
