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

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

LogicalAxes = Sequence[str | None]


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
      kernel_init=param_init(nnx.initializers.normal(std), axes),
      bias_init=param_init(nnx.initializers.zeros_init(), axes[-1:]),
      rngs=rngs,
  )


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
