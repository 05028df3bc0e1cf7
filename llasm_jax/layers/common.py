"""Parameters with logical axis names, dense layers, norms and activation sharding hints.

Models only ever name logical axes. Weights use "embed", "heads", "kv_heads", "mlp", "vocab",
"layers" (and a few Whisper-only names); activations use "batch", "length", "head_dim" and
"act_embed", "act_heads", ... so that a rules table can shard a weight's width over "fsdp"
while the activation of that width stays whole and its batch is split. Which mesh axis each maps
to is decided by one rules table per run config (see `llasm_jax.sharding`), installed with
`flax.nnx.logical_axis_rules`; without rules every hint here is a no-op, so the models run
unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

LogicalAxes = Sequence[str | None]

# The randomness of dropout, present only while a training step traces the model (see
# `dropout_rng`): evaluation and generation never set it, so every dropout there is off.
_DROPOUT = contextvars.ContextVar("llasm_dropout_rng", default=None)


class Buffer(nnx.Variable):
  """A non-trainable array stored with the parameters (e.g. Whisper's sinusoidal positions)."""


def param_init(init, axes: LogicalAxes):
  """Wraps an initializer so the variable carries logical axis names.

  Variables are never sharded eagerly at creation: placement is done once for the whole
  model by `jax.jit(..., out_shardings=...)`, which keeps model code free of meshes.
  """
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Sharding hint for an activation, in logical names; a no-op without rules and mesh."""
  rules = spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec = jax.sharding.PartitionSpec(*spmd.from_sharding_rules(tuple(axes), rules))
  return jax.lax.with_sharding_constraint(x, spec)


def dense(
    in_features: int,
    out_features: int,
    axes: LogicalAxes,
    *,
    use_bias: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    std: float = 0.02,
) -> nnx.Linear:
  """`nnx.Linear` with kernel float[in, out] named `axes` and bias named `axes[-1]`."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      **dense_inits(axes, std),
  )


def dense_inits(axes: LogicalAxes, std: float = 0.02) -> dict:
  """The kernel and bias initializers of `dense` (also those of `LoraLinear`'s base)."""
  return dict(kernel_init=param_init(nnx.initializers.normal(std), axes),
              bias_init=param_init(nnx.initializers.zeros_init(), axes[-1:]))


def layer_norm(features: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features,
      epsilon=eps,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=param_init(nnx.initializers.ones_init(), ("embed",)),
      bias_init=param_init(nnx.initializers.zeros_init(), ("embed",)),
      rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: normalised in float32, cast back, then scaled (the order HF uses)."""

  def __init__(self, features: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.dtype = dtype
    self.weight = nnx.Param(
        param_init(nnx.initializers.ones_init(), ("embed",))(None, (features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None) -> Iterator[None]:
  """Turns dropout on, drawn from `key` (a typed PRNG key), while the block traces a model.

  Models take no rngs argument and hold no RNG state: the train step sets the key, `LayerStack`
  gives each layer its own split, and each dropout site takes the next `next_dropout_key()`, in
  the order the trace reaches them (fixed, so a step is reproducible). None: dropout stays off.
  """
  token = _DROPOUT.set(None if key is None else [key, 0])
  try:
    yield
  finally:
    _DROPOUT.reset(token)


def current_dropout_rng() -> jax.Array | None:
  """The key of the innermost `dropout_rng` block, or None outside one (dropout off)."""
  state = _DROPOUT.get()
  return None if state is None else state[0]


def next_dropout_key() -> jax.Array | None:
  """A fresh key for one dropout site, or None when dropout is off (evaluation, generation)."""
  state = _DROPOUT.get()
  if state is None:
    return None
  state[1] += 1
  return jax.random.fold_in(state[0], state[1])


def embed_lookup(embed: nnx.Embed, ids: jax.Array) -> jax.Array:
  """int[B, T] -> float[B, T, D]: rows of `embed`'s table, in its compute dtype.

  The table's width is gathered first (as FSDP gathers every weight before use) while its rows
  stay split over "tensor": each device looks up the ids its rows hold and one all-reduce joins
  them into the batch-sharded activation. Left to itself, XLA looked up in the width-sharded table
  and could not reshard the result ("Involuntary full rematerialization" on data x fsdp x tensor
  meshes): it replicated the whole [B, T, D] first."""
  if hasattr(embed, "lookup"):  # a table stored otherwise (int8 rows + scales: `quantize.Int8Embed`)
    return constrain(embed.lookup(ids), ("batch", "length", "act_embed"))
  table = constrain(embed.embedding[...].astype(embed.dtype or embed.embedding.dtype), ("vocab", None))
  return constrain(jnp.take(table, ids, axis=0), ("batch", "length", "act_embed"))
