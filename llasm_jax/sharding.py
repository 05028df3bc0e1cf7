"""The device mesh of a run config and the shardings that its logical axis rules give."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llasm_jax.errors import UserError

Rules = Sequence[tuple[str, Any]]

# Logical axis -> mesh axis (or axes, or None = replicated), for the ("data", "fsdp", "tensor")
# mesh. Weights: their width ("embed") over "fsdp", heads/MLP/vocab over "tensor". Activations
# ("act_*", "batch", ...): the batch over "data" and "fsdp" together (FSDP is data parallelism
# whose weights are gathered per layer), the width whole, heads/MLP/vocab over "tensor".
# Vocab sizes such as 32003 (LLaSM-Cllama2) and 51865 (Whisper) do not divide by a tensor axis
# > 1: keep tensor=1 for those models or map "vocab" and "act_vocab" to None.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Weights:
    ("embed", "fsdp"),  # the model width (LLM hidden_size, Whisper d_model), norms and biases too
    ("heads", "tensor"),  # attention heads x head dim (LLM queries and o_proj; all of Whisper's q, k, v)
    ("kv_heads", "tensor"),  # LLM key/value heads x head dim
    ("mlp", "tensor"),  # MLP hidden width (and the "encoder"-mode adaptor's)
    ("vocab", "tensor"),  # token embedding rows, LM-head columns
    ("layers", None),  # the stacked-layers axis of LayerStack (what scan_layers scans)
    ("conv", None),  # Whisper conv kernel taps (3)
    ("mel", None),  # Whisper conv1 input channels: the mel bins
    ("embed_in", None),  # Whisper conv2 input channels (d_model)
    ("audio_embed", None),  # adaptor input: the Whisper width ("encoder" mode: times stack_factor)
    # Activations:
    ("batch", ("data", "fsdp")),  # rows of a batch
    ("length", None),  # sequence positions (tokens, audio frames)
    ("head_dim", None),  # features of one attention head
    ("act_embed", None),  # hidden states' width between layers
    ("act_heads", "tensor"),  # attention query heads and their outputs
    ("act_kv_heads", "tensor"),  # attention key/value heads
    ("act_mlp", "tensor"),  # MLP hidden activations
    ("act_vocab", "tensor"),  # logits
)

# The device mesh, outermost axis first: config.mesh.shape gives each axis's size, and one of them
# may be -1 (the devices left over). tensor is innermost, on the fastest links.
MESH_AXES = (
    "data",  # data parallelism: the batch splits, every device holds all the weights
    "fsdp",  # the batch splits too, and so do the weights' "embed" dimension (gathered layer by layer)
    "tensor",  # tensor parallelism: heads, MLP widths and the vocab split
)

log = logging.getLogger(__name__)
# (array path, shape, mesh axes dropped) already warned about: once per array per process, however
# many times the shardings are worked out (train state, restore, engine).
_replicated_warned: set[tuple] = set()


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves one -1 entry of `config.mesh.shape` so that the product is `num_devices`."""
  unknown = [k for k in shape if k not in MESH_AXES]
  if unknown:
    raise UserError(f"config.mesh.shape: unknown axis {unknown[0]!r}; axes are {', '.join(MESH_AXES)}")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise UserError(f"config.mesh.shape {sizes}: at most one axis may be -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if known <= 0 or num_devices % known:
      raise UserError(f"config.mesh.shape {sizes}: {num_devices} devices do not divide by {known}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise UserError(f"config.mesh product {math.prod(sizes.values())} != {num_devices} devices; "
                     "fix config.mesh.shape or set one axis to -1")
  return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over all devices (tensor innermost: the fastest links)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(shape, len(devices))
  # Auto axes: layers give logical hints with `constrain` and XLA propagates the rest.
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions have logical names `axes`."""
  missing = [a for a in axes if a is not None and a not in dict(rules)]
  if missing:
    raise UserError(f"logical axis {missing[0]!r} has no entry in config.logical_axis_rules")
  return PartitionSpec(*spmd.from_sharding_rules(tuple(axes), rules))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an `nnx.State`, from each variable's logical `out_sharding`.

  A dimension that does not divide over its mesh axes (a vocab of 32003 over tensor=2, say)
  is replicated along them instead of failing: the array still loads, only less split. That
  costs memory on every device, so it is logged (a warning, once per array, with the bytes).
  """
  with nnx.logical_axis_rules(tuple(rules)):
    specs = nnx.get_partition_spec(abstract_state)

  def fit(path, var, spec):
    wanted = spec.get_value()
    got = divisible_spec(var.shape, wanted, mesh)
    dropped = _dropped_dims(var.shape, wanted, mesh)
    if dropped:
      _warn_replicated(_path_name(path), var.shape, np.dtype(var.get_value().dtype), wanted, got, dropped, mesh)
    return spec.replace(NamedSharding(mesh, got))

  return jax.tree_util.tree_map_with_path(fit, abstract_state, specs, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _axes(names) -> tuple[str, ...]:
  return () if names is None else (names,) if isinstance(names, str) else tuple(names)


def _dropped_dims(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> list[tuple[int, tuple[str, ...]]]:
  """(dimension, its mesh axes) for each dimension of `shape` that those axes do not evenly divide."""
  names = tuple(spec) + (None,) * (len(shape) - len(spec))
  return [(d, _axes(n)) for d, (size, n) in enumerate(zip(shape, names))
          if size % math.prod(mesh.shape[a] for a in _axes(n))]


def divisible_spec(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """`spec` with the mesh axes of every dimension they do not evenly divide removed."""
  dropped = {d for d, _ in _dropped_dims(shape, spec, mesh)}
  names = tuple(spec) + (None,) * (len(shape) - len(spec))
  return PartitionSpec(*(None if d in dropped else n for d, n in enumerate(names[:len(shape)])))


def _path_name(path) -> str:
  """A state key path as "llm/model/embed_tokens/embedding"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _bytes(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
  return f"{n:.0f} B"


def _warn_replicated(name: str, shape, dtype: np.dtype, wanted: PartitionSpec, got: PartitionSpec,
                     dropped: list[tuple[int, tuple[str, ...]]], mesh: Mesh) -> None:
  key = (name, tuple(shape), tuple(dropped))
  if key in _replicated_warned:
    return
  _replicated_warned.add(key)
  total = math.prod(shape) * dtype.itemsize
  split = lambda spec: math.prod(mesh.shape[a] for n in spec for a in _axes(n))
  dims = "; ".join(f"dimension {d} ({shape[d]}) does not divide over mesh axes {'x'.join(axes)} "
                   f"({math.prod(mesh.shape[a] for a in axes)} devices)" for d, axes in dropped)
  log.warning(f"{name} {dtype.name}{list(shape)} ({_bytes(total)}) is replicated along mesh axes it should be split "
              f"over: {dims}; each device holds {_bytes(total / split(got))} of it instead of "
              f"{_bytes(total / split(wanted))}. Pad that dimension to a multiple (a vocab: "
              "config.model.llm.vocab_multiple=128) or change config.mesh.shape")


def shard_batch(x: np.ndarray, mesh: Mesh, rules: Rules, axes: Sequence[str | None]) -> jax.Array:
  """A global array from a host array that every process holds in full (same seed everywhere)."""
  spec = logical_spec(axes, rules)
  for dim, (size, names) in enumerate(zip(x.shape, spec)):
    names = () if names is None else (names,) if isinstance(names, str) else names
    parts = math.prod(mesh.shape[n] for n in names)
    if size % parts:
      raise UserError(f"dimension {dim} ({axes[dim]}) of size {size} does not divide over mesh axes "
                       f"{names} of {parts} devices; use a {axes[dim]} size that is a multiple of {parts}")
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
