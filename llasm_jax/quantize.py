"""int8 weights for inference: an LLM's projection kernels stored as int8 + scales, through qwix.

Legend: L layers (the stacked "layers" axis), I input features, O output features, B batch,
T length.

    model = quantize(model, "int8")   # a LlamaForCausalLM, or a Llasm (its `llm` only)
    Engine(model)                      # runs as before; the kernels are int8 in its state

Each `nnx.Linear` of the LLM (q/k/v/o, gate/up/down, and an untied lm_head) gets, in place of its
float kernel float[(L,) I, O], a qwix `WithAux(QArray)` whose leaves are two `nnx.Param`s:

    kernel/array/qvalue  int8[(L,) I, O]   round(W / scale), clipped to [-127, 127]
    kernel/array/scale   float[(L,) 1, O]  absmax of each output column over I / 127, per layer

(symmetric absmax, one scale per layer and output channel; the scale is in the model's compute
dtype). They keep the kernel's logical axis names, the scale with None on its size-1 I axis, so
on a mesh the int8 kernel shards exactly as the float one did and the scale follows its O axis.

At call time qwix intercepts `jax.lax.dot_general` while the LLM's `__call__`, `logits` or other
public methods run (a `PtqProvider`: the quantized weights are prepared here, never on the fly): a dot whose
right-hand side is such a WithAux runs as qwix's dot_general of the QArray, every other dot as
before. Modes:
- "int8": weight-only, activations stay float. qwix dequantizes the int8 kernel (q * scale) and
  runs a float matmul. XLA:CPU does not fuse the two: it writes the dequantized kernel out, then
  multiplies. In the decode loop a layer's kernel is small enough for that to stay in cache (the
  memory traffic is the int8 kernel), but an untied LM head is dequantized once per decode call,
  hoisted out of the loop, into a float temporary as large as the float head
  (bench/results/quantize_cpu2.md measures both). Accelerator backends can fuse the convert into
  the matmul (not measured here).
- "w8a8": int8 weights as above, and each activation row quantized to int8 on the fly (qwix's
  dynamic-range mode, per-token absmax scales): qwix's int8 x int8 -> int32 dot, rescaled after.
  On XLA:CPU that dot runs in YNNPACK and reads the int8 kernel directly: the fastest decode here,
  but int8 activations cost accuracy (SmolLM2: logits 12% off float32 vs 4% for "int8"; activation
  outliers would need smoothing first).
- "none": the model unchanged.

Not quantized, by choice: the token embedding (a gather of B rows per step: int8 would only save
memory, and its lookup reads the float table directly), a tied LM head (it is that embedding; an
int8 copy would add memory), LoRA factors (small; they stay float next to the int8 base kernel),
norms, and Whisper and the adaptor of a Llasm (they run once per audio, not per token).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from qwix._src import model as qwix_model
from qwix._src.core import qarray
from qwix._src.providers import ptq

from llasm_jax.errors import UserError
from llasm_jax.models.llama import LlamaForCausalLM
from llasm_jax.models.llasm import Llasm

QUANTIZE_MODES = ("none", "int8", "w8a8")
QUANTIZE_HELP = ("int8: the LLM's projection kernels stored int8 with per-channel scales, activations float "
                 "(a quarter of their float32 memory); w8a8: the activations int8 too, for an int8 matmul "
                 "(faster on CPU, less accurate); none (default): as stored")


class _QuantizedDots(qwix.PtqProvider):
  """qwix PTQ that only runs the kernels `quantize` prepared: a dot whose right-hand side is a
  float array (activations, attention, LoRA factors, a tied head) stays exactly as it was, where
  PTQ would otherwise quantize a recognized weight during the call."""

  def __init__(self, act_qtype):
    super().__init__([qwix.QtRule(module_path=".*", op_names=("dot_general",), weight_qtype=jnp.int8,
                                  act_qtype=act_qtype)])
    self.act_qtype = act_qtype

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                  out_sharding=None):
    if not isinstance(rhs, ptq.WithAux):
      return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    (lhs_contract, _), (lhs_batch, _) = dimension_numbers
    rows = [d for d in range(lhs.ndim) if d not in lhs_contract and d not in lhs_batch]
    if self.act_qtype is not None and jax.default_backend() == "cpu" and rows and math.prod(
        lhs.shape[d] for d in rows) == 1:
      # XLA:CPU runs an int8 dot of a single row (batch-1 decode) as a slow loop; two rows take
      # its YNNPACK matmul (10x faster). The zero row is dropped again.
      pad = [(0, 1 if d == rows[0] else 0) for d in range(lhs.ndim)]
      out = super().dot_general(jnp.pad(lhs, pad), rhs, dimension_numbers, out_sharding=out_sharding)
      return jax.lax.slice_in_dim(out, 0, 1, axis=len(lhs_batch))  # rows[0]'s place in the output
    return super().dot_general(lhs, rhs, dimension_numbers, out_sharding=out_sharding)


def quantize(model: LlamaForCausalLM | Llasm, mode: str = "int8", *, lm_head: bool = True, embedding: bool = True):
  """A copy of `model` whose LLM projection kernels are int8 + scales (see the module docstring);
  "none" returns `model` itself. lm_head=False keeps an untied LM head float; embedding=False the
  token embedding (and a tied head with it).

  Works on stacked (scan_layers) and unrolled models alike, and on sharded parameters: the int8
  kernels keep their kernels' shardings, so `Engine(model, mesh=..., rules=...)` runs it as it
  runs the float model."""
  if mode not in QUANTIZE_MODES:
    raise UserError(f"quantize mode {mode!r}: expected one of {', '.join(QUANTIZE_MODES)} "
                     "(int8: int8 weights, float activations; w8a8: int8 activations too)")
  if mode == "none":
    return model
  if isinstance(model, Llasm):
    out = nnx.clone(model)
    out.llm = quantize(model.llm, mode, lm_head=lm_head, embedding=embedding)
    return out
  if not isinstance(model, LlamaForCausalLM):
    raise UserError(f"cannot quantize a {type(model).__name__}; pass a LlamaForCausalLM or a Llasm "
                     "(Whisper stays float)")
  if hasattr(type(model), "_unquantized_type"):
    raise UserError("this model is quantized already; quantize the float model")
  llm = nnx.clone(model)
  dtype = jnp.dtype(llm.cfg.dtype)
  for path, module in nnx.iter_modules(llm):
    if isinstance(module, nnx.Linear) and (lm_head or path != ("lm_head",)):
      module.kernel = _int8_kernel(module.kernel, dtype)
  if embedding:
    llm.model.embed_tokens = Int8Embed(llm.model.embed_tokens)
  provider = _QuantizedDots(jnp.int8 if mode == "w8a8" else None)
  # quantize_model names every module for qwix's rules and intercepts `__call__`; nothing runs
  # (skip_nnx_init: the kernels are quantized already), so the dummy input is never read.
  llm = qwix.quantize_model(llm, provider, jnp.zeros((1, 1), jnp.int32), skip_nnx_init=True)
  # The engine calls `logits` (the LM head) apart from `__call__`: it and every other public method
  # are intercepted the same way, with qwix's own helper (quantize_model takes one NNX method).
  for name, fn in vars(LlamaForCausalLM).items():
    if inspect.isfunction(fn) and not name.startswith("_"):
      setattr(type(llm), name, qwix_model._apply_interceptors(
          fn, provider, output_transform=functools.partial(qwix_model._output_transform_nnx, provider, name)))
  return llm


def _int8_kernel(kernel: nnx.Param, scale_dtype) -> ptq.WithAux:
  """float[(L,) I, O] kernel -> WithAux(QArray(int8[(L,) I, O], float[(L,) 1, O])), both Params
  with the kernel's metadata (the scale's I axis unnamed)."""
  value = kernel.get_value()
  axis = value.ndim - 2  # I, the axis nnx.Linear contracts
  how = qarray.HowToQuantize(qtype=jnp.int8, channelwise_axes=tuple(a for a in range(value.ndim) if a != axis))

  def run(w):
    q = qarray.quantize(jnp.asarray(w, jnp.float32), how)
    return q.qvalue, q.scale.astype(scale_dtype)

  sh = getattr(value, "sharding", None)
  if isinstance(sh, NamedSharding):
    spec = tuple(sh.spec) + (None,) * (value.ndim - len(sh.spec))
    scale_sh = NamedSharding(sh.mesh, PartitionSpec(*(None if d == axis else n for d, n in enumerate(spec))))
    qvalue, scale = jax.jit(run, out_shardings=(sh, scale_sh))(value)
  else:
    qvalue, scale = jax.jit(run)(value)
  names = kernel.get_metadata().get("out_sharding")
  scale_names = None if names is None else tuple(None if d == axis else n for d, n in enumerate(names))
  return ptq.WithAux(qarray.QArray(kernel.replace(qvalue), kernel.replace(scale, out_sharding=scale_names),
                                   qtype=jnp.int8), how)


class Int8Embed(nnx.Module):
  """A token embedding stored as int8 rows and one scale per row (symmetric absmax), in place of
  an `nnx.Embed` float[V, D]:

    qvalue  int8[V, D]   round(row / scale), clipped to [-127, 127]
    scale   float[V, 1]  absmax of the row / 127

  A lookup gathers the int8 rows and their scales, then multiplies: exact per row, and the float
  table never exists. A tied LM head (`attend`) multiplies by the dequantized table; inside a
  decode loop XLA computes that once per call, outside the loop (a float temporary of the table's
  size while it runs)."""

  def __init__(self, embed: nnx.Embed):
    table = embed.embedding
    self.dtype = jnp.dtype(embed.dtype or table.dtype)
    value = table.get_value()
    how = qarray.HowToQuantize(qtype=jnp.int8, channelwise_axes=(0,))

    def run(w):
      q = qarray.quantize(jnp.asarray(w, jnp.float32), how)
      return q.qvalue, q.scale.astype(self.dtype)

    sh = getattr(value, "sharding", None)
    if isinstance(sh, NamedSharding):
      rows = tuple(sh.spec)[:1] or (None,)
      qvalue, scale = jax.jit(run, out_shardings=(sh, NamedSharding(sh.mesh, PartitionSpec(*rows, None))))(value)
    else:
      qvalue, scale = jax.jit(run)(value)
    names = table.get_metadata().get("out_sharding")
    self.qvalue = table.replace(qvalue)
    self.scale = table.replace(scale, out_sharding=None if names is None else (names[0], None))
    self.num_embeddings, self.features = value.shape

  def lookup(self, ids: jax.Array) -> jax.Array:
    """int[B, T] -> float[B, T, D] in the compute dtype."""
    rows = jnp.take(self.qvalue[...], ids, axis=0).astype(self.dtype)
    return rows * jnp.take(self.scale[...], ids, axis=0)

  @property
  def embedding(self) -> jax.Array:
    """The dequantized table float[V, D] (what an `nnx.Embed` holds)."""
    return self.qvalue[...].astype(self.dtype) * self.scale[...]

  def attend(self, query: jax.Array) -> jax.Array:
    """float[..., D] -> float[..., V]: the tied LM head, as `nnx.Embed.attend`."""
    return jnp.dot(query.astype(self.dtype), self.embedding.T)


def weight_bytes(model: nnx.Module) -> dict[str, int]:
  """Bytes of the model's parameters by dtype name ("float32", "bfloat16", "int8", ...), and
  "total"; for an int8 model the scales count under their float dtype."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    name = np.dtype(leaf.dtype).name
    out[name] = out.get(name, 0) + int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  out["total"] = sum(out.values())
  return out


def quantized_paths(model: nnx.Module) -> list[str]:
  """Slash-joined paths of the int8 kernels ("model/layers/layers/self_attn/q_proj/kernel", ...)."""
  return ["/".join(map(str, path + ("kernel",))) for path, module in nnx.iter_modules(model)
          if isinstance(getattr(module, "kernel", None), ptq.WithAux)]
