"""LoRA: a dense layer plus a trainable low-rank update, y = x W + b + (alpha / r) dropout(x) A B.

Legend: I input features, O output features, R the LoRA rank.

`LoraLinear` is an `nnx.Linear` (same `kernel` and `bias`, so checkpoints and key maps do not
change) with two more parameters, `lora_a` float[I, R] and `lora_b` float[R, O]. They start as
PEFT starts them (A Kaiming-uniform, B zero), so a fresh adapter leaves the model unchanged, and
they are stored in the same [in, out] layout as the kernel: PEFT's `lora_A.weight` is A^T and
`lora_B.weight` is B^T (llasm_jax/convert/peft.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llasm_jax.layers.common import LogicalAxes, dense, dense_inits, next_dropout_key, param_init
from llasm_jax.errors import UserError

# The names of the two factors in a parameter path ("llm/.../q_proj/lora_a").
LORA_FACTORS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters of an LLM's projections (set by config.train.lora; rank 0 = none)."""

  rank: int = 0  # R: the inner width of A float[in, R] and B float[R, out]; 0 = no adapters
  alpha: float = 16.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
  dropout: float = 0.0  # dropout on the input of A, in training steps only (PEFT's lora_dropout)
  targets: tuple[str, ...] = ()  # the adapted projections by module name ("q_proj", "v_proj", ...)

  def __post_init__(self):
    if self.rank < 0:
      raise UserError(f"LoRA rank {self.rank}: expected >= 0 (0 = no adapters)")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"LoRA dropout {self.dropout}: expected a probability in [0, 1)")
    if self.rank and not self.targets:
      raise UserError(f"LoRA rank {self.rank} without targets: name the projections to adapt")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def applies_to(self, name: str) -> bool:
    return bool(self.rank) and name in self.targets


def is_lora_path(path: str) -> bool:
  """Whether a slash-joined parameter path names a LoRA factor."""
  return path.rsplit("/", 1)[-1] in LORA_FACTORS


class LoraLinear(nnx.Linear):
  """`nnx.Linear` plus the scaled low-rank update; x float[..., I] -> float[..., O]."""

  def __init__(self, in_features: int, out_features: int, axes: LogicalAxes, lora: LoraConfig, *,
               use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs, std: float = 0.02):
    inits = dense_inits(axes, std)
    kernel_key = []

    def kernel_init(key, *args):
      kernel_key.append(key)
      return inits["kernel_init"](key, *args)

    super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs, kernel_init=kernel_init, bias_init=inits["bias_init"])
    self.rank, self.scale, self.dropout = lora.rank, lora.scale, lora.dropout
    # PEFT's kaiming_uniform_(a=sqrt(5)) on lora_A float[R, I]: U(-1/sqrt(I), 1/sqrt(I)). Its key
    # comes from the kernel's, not from `rngs`, so that adding LoRA changes no other parameter's
    # init. The rank axis is tiny and stays whole; the other axis shards as the kernel's does.
    bound = 1.0 / math.sqrt(in_features)
    kaiming = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    a_key = jax.random.fold_in(kernel_key[0], 1)
    self.lora_a = nnx.Param(param_init(kaiming, (axes[0], None))(a_key, (in_features, lora.rank), param_dtype))
    self.lora_b = nnx.Param(param_init(nnx.initializers.zeros_init(), (None, axes[-1]))(
        None, (lora.rank, out_features), param_dtype))

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding)
    x = inputs.astype(self.dtype)
    key = next_dropout_key() if self.dropout else None
    if key is not None:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
    update = jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b)
    return y + (self.scale * update).astype(y.dtype)


def lora_dense(in_features: int, out_features: int, axes: LogicalAxes, lora: LoraConfig | None, *, use_bias: bool,
               dtype, param_dtype, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Linear:
  """`dense`, or a `LoraLinear` when `lora` is given with a rank (the same kernel and bias init)."""
  if lora is None or not lora.rank:
    return dense(in_features, out_features, axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 rngs=rngs, std=std)
  return LoraLinear(in_features, out_features, axes, lora, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs, std=std)
