"""A stack of identical layers stored with a leading "layers" axis, run scanned or unrolled.

The parameter layout is the same either way (float[L, ...] per leaf), so a checkpoint does
not depend on `scan`: scanning compiles one layer body (a 32-layer model compiles in
seconds), unrolling lets XLA schedule across layers. Both give the same numbers.

`unstack_layers` turns the stacks of a model into L layers with arrays of their own, for decoding
on XLA:CPU: see there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from llasm_jax.layers.common import current_dropout_rng, dropout_rng
from llasm_jax.errors import UserError

# Names accepted in model configs for `remat_policy`.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_everything": jax.checkpoint_policies.everything_saveable,
}


class LayerStack(nnx.Module):
  """`num_layers` copies of `make_layer(rngs)`, each with its own random init."""

  def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return make_layer(rngs)

    self.num_layers = num_layers
    self.layers = make(rngs)

  def __call__(
      self,
      x: Any,
      per_layer: Any = None,
      *,
      method: str = "__call__",
      scan: bool = True,
      remat_policy: str = "none",
      carry_per_layer: bool = False,
      **shared,
  ) -> tuple[Any, Any]:
    """Threads `x` through the layers: `x, out_l = layer.method(x, per_layer[l], **shared)`.

    `per_layer` is a pytree with a leading layer axis (a KV cache slice, say) or None; the
    per-layer outputs come back stacked along a new leading axis.

    With `carry_per_layer`, `per_layer` travels whole in the carry instead:
    `x, per_layer = layer.method(x, (per_layer, l), **shared)`, and the final `per_layer` comes
    back. A layer that updates only its own part (one cache slot) then updates it in place;
    scanning it as xs -> ys copies the whole pytree at every call (a KV cache at every step).

    Inside a `dropout_rng` block (a training step) each layer runs in a block of its own split
    of that key, which travels with its parameters through the scan, so layers drop differently.
    """
    if remat_policy not in REMAT_POLICIES:
      raise UserError(f"remat_policy {remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
    if self.unstacked:  # L modules: nothing to scan over
      graphdef, params, scan = nnx.graphdef(self.layers[0]), [nnx.state(m) for m in self.layers], False
      at = lambda i: params[i]
    else:
      graphdef, params = nnx.split(self.layers)
      at = lambda i: jax.tree.map(lambda a: a[i], params)
    rng = current_dropout_rng()
    keys = None if rng is None else jax.random.split(rng, self.num_layers)
    if carry_per_layer:
      return self._carried(graphdef, params, at, keys, x, per_layer, method, scan, remat_policy, shared)

    def body(carry, xs):
      layer_params, layer_in, key = xs
      layer = nnx.merge(graphdef, layer_params)
      with dropout_rng(key):
        return getattr(layer, method)(carry, layer_in, **shared)

    if remat_policy != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
      return jax.lax.scan(body, x, (params, per_layer, keys))
    outs = []
    for i in range(self.num_layers):
      x, out = body(x, (at(i), *jax.tree.map(lambda a: a[i], (per_layer, keys))))
      outs.append(out)
    return x, jax.tree.map(lambda *a: jax.numpy.stack(a), *outs)

  def _carried(self, graphdef, params, at, keys, x, state, method, scan, remat_policy, shared):
    def body(carry, xs):
      x, state = carry
      layer_params, l, key = xs
      layer = nnx.merge(graphdef, layer_params)
      with dropout_rng(key):
        return getattr(layer, method)(x, (state, l), **shared), None

    if remat_policy != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
      (x, state), _ = jax.lax.scan(body, (x, state), (params, jax.numpy.arange(self.num_layers), keys))
      return x, state
    for i in range(self.num_layers):
      (x, state), _ = body((x, state), (at(i), i, None if keys is None else keys[i]))
    return x, state

  @property
  def unstacked(self) -> bool:
    """Whether the layers are held as L modules (`unstack_layers`) rather than one stacked module."""
    return isinstance(self.layers, nnx.List)


def unstack_layers(module: nnx.Module) -> nnx.Module:
  """Makes every `LayerStack` in `module` hold its L layers as L modules, each with its own arrays
  (sliced from the stack: a copy), so that they run unrolled and each layer reads buffers of its
  own; returns `module` (changed in place: pass a copy, e.g. `nnx.merge(*nnx.split(model))`).

  Why: XLA:CPU does not fuse a slice into the dot that reads it: a layer's slice of a stacked
  weight (scanned or unrolled) is copied before every use, so a decode step read each weight
  about three times (read, write the copy, read it); unstacked, once. Make the copy once, outside
  jit, and keep it (as `Engine` does): inside a jitted call it is made again at every call, into
  fresh memory (about 0.1 s for llama_100m on a 2-core CPU, more than a decode step).
  """
  for _, m in nnx.iter_modules(module):
    if isinstance(m, LayerStack) and not m.unstacked:
      graphdef, params = nnx.split(m.layers)
      m.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], params))
                           for i in range(m.num_layers)])
  return module
