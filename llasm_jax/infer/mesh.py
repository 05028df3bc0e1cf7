"""Jitted pure functions of one model's parameters, on one device or sharded on a mesh: placement, shardings, transfers.

Every inference object (`engine.Engine`, `audio_embed.AudioEmbedder`, `batching.SlotEngine`,
`transcribe.Transcriber`) holds a `MeshFunctions` and jits its functions through it. On a mesh
every function is jitted with explicit in/out shardings and traced while the mesh and logical
axis rules are installed, so the models' `constrain` hints apply. Without a mesh the shardings
are None and ignored.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llasm_jax import sharding
from llasm_jax.errors import UserError


def bucket(n: int, minimum: int = 16) -> int:
  """Length bucket: powers of two up to 1024, then multiples of 1024."""
  if n <= 1024:
    return max(minimum, 1 << max(0, n - 1).bit_length())
  return -(-n // 1024) * 1024


class MeshFunctions:
  """Parameter placement, the shardings of host inputs, host <-> device transfers, and one
  `jax.jit` per (function name, static arguments), on one device or on `mesh` with `rules`.

  traces: how often each function was traced, i.e. compiled (the tests read it).
  batch_multiple: rows are padded to a multiple of the devices the batch is split over.
  """

  def __init__(self, mesh: jax.sharding.Mesh | None, rules: Sequence[tuple[str, object]] | None):
    if (mesh is None) != (rules is None):
      raise UserError("pass both mesh and rules (e.g. sharding.DEFAULT_RULES), or neither")
    self.mesh, self.rules = mesh, None if rules is None else tuple(tuple(r) for r in rules)
    self.traces: collections.Counter[str] = collections.Counter()
    self._jitted: dict[tuple, Callable] = {}
    self.batch_multiple = 1
    if mesh is not None:
      names = sharding.logical_spec(("batch",), self.rules)[0]
      names = () if names is None else (names,) if isinstance(names, str) else names
      self.batch_multiple = int(np.prod([mesh.shape[n] for n in names]))

  def rows(self, n: int) -> int:
    """Rows of a batch of `n` real rows: a power of two, a multiple of the batch devices."""
    return -(-bucket(max(n, 1), minimum=1) // self.batch_multiple) * self.batch_multiple

  def place(self, model: nnx.Module) -> None:
    """Puts parameters that are not yet where they belong onto the device (or into their shards
    on the mesh), once. Host (numpy) parameters, as `convert.hf.load_tensors` leaves them, would
    otherwise be copied to the device at every call."""
    state = nnx.state(model)
    leaves = jax.tree.leaves(state)
    if self.mesh is None:
      if any(not isinstance(x, jax.Array) for x in leaves):
        nnx.update(model, jax.tree.map(jnp.asarray, state))
    elif any(not isinstance(x, jax.Array) or getattr(x.sharding, "mesh", None) != self.mesh for x in leaves):
      # `checkpoint.load_model(mesh=, rules=)` restores straight into the shards; this is the fallback.
      nnx.update(model, jax.device_put(state, sharding.state_shardings(state, self.mesh, self.rules)))

  # ---- shardings (None without a mesh) ---------------------------------------------------

  def logical(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding | None:
    """NamedSharding of an array with logical `axes`; dims of `shape` that do not divide stay whole."""
    if self.mesh is None:
      return None
    spec = sharding.logical_spec(axes, self.rules)
    if shape is not None:
      spec = sharding.divisible_spec(shape, spec, self.mesh)
    return NamedSharding(self.mesh, spec)

  def replicated(self) -> NamedSharding | None:
    return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

  @staticmethod
  def shardings_of(tree):
    """The shardings arrays already have (parameters stay where `checkpoint.load_model` put them)."""
    return jax.tree.map(lambda x: x.sharding, tree)

  # ---- transfers -------------------------------------------------------------------------

  def put(self, x, sh):
    """Host array -> device array in sharding `sh` (every process holds the same full array)."""
    if self.mesh is None:
      return jnp.asarray(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

  def get(self, x) -> np.ndarray:
    if self.mesh is not None and jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  # ---- jit -------------------------------------------------------------------------------

  @contextlib.contextmanager
  def tracing(self):
    """Calls of jitted functions go in here: tracing happens on a bucket's first call, and the
    models' `constrain` reads the mesh and rules then."""
    if self.mesh is None:
      yield
    else:
      with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
        yield

  def jit(self, name: str, fn: Callable, in_sh, out_sh, donate=(), **static) -> Callable:
    """`fn` with `static` bound, jitted once per (name, static); the shardings apply on a mesh."""
    key = (name, *sorted(static.items()))
    if key not in self._jitted:
      fn = functools.partial(fn, **static)
      if self.mesh is None:
        self._jitted[key] = jax.jit(fn, donate_argnums=donate)
      else:
        self._jitted[key] = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=donate)
    return self._jitted[key]
