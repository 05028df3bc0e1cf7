"""Hugging Face state dicts <-> llasm_jax parameter trees, through the per-family key maps."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import numpy as np
from flax import nnx, traverse_util

from llasm_jax.convert.keymap import (
    LINEAR_ADAPTOR_RULES, LLAMA_IGNORED, LLAMA_RULES, MLP_ADAPTOR_RULES, WHISPER_IGNORED, WHISPER_RULES, KeyMap,
    to_hf_layout, to_jax_layout)

# In "encoder" mode the Whisper decoder is never run, so its tensors are left out.
_WHISPER_DECODER = re.compile(r"^decoder\.")


def whisper_name(name: str) -> str:
  """`WhisperForConditionalGeneration` stores `model.encoder...`; `WhisperModel` stores `encoder...`."""
  return name[len("model."):] if name.startswith(("model.encoder.", "model.decoder.")) else name


def keymaps(kind: str, mode: str = "llasm") -> list[KeyMap]:
  """Key maps of a model kind: "llama", "whisper", or "llasm" (the composite, in `mode`)."""
  if kind == "llama":
    return [KeyMap(LLAMA_RULES, ignored=LLAMA_IGNORED)]
  if kind == "whisper":
    return [KeyMap(WHISPER_RULES, ignored=WHISPER_IGNORED)]
  if kind == "llasm":
    if mode == "llasm":
      return [KeyMap(LLAMA_RULES, "llm/", LLAMA_IGNORED), KeyMap(LINEAR_ADAPTOR_RULES, "adaptor/"),
              KeyMap(WHISPER_RULES, "audio/", WHISPER_IGNORED)]
    return [KeyMap(LLAMA_RULES, "llm/", LLAMA_IGNORED), KeyMap(MLP_ADAPTOR_RULES, "adaptor/"),
            KeyMap(WHISPER_RULES, "audio/", WHISPER_IGNORED + [_WHISPER_DECODER])]
  raise ValueError(f"unknown model kind {kind!r}: expected 'llama', 'whisper' or 'llasm'")


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """Slash-joined parameter path -> array, for every variable of `model`."""
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep="/")


def load_tensors(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], maps: list[KeyMap],
                 *, rename=lambda n: n) -> None:
  """Fills every parameter of `model` from (HF name, array) pairs; strict both ways.

  Raises on a tensor that maps nowhere, a shape that disagrees with the config (naming the
  tensor), and on parameters left unfilled.
  """
  current = flat_params(model)
  out = {p: np.empty(a.shape, a.dtype) for p, a in current.items()}
  filled: dict[str, int] = {}
  for name, array in tensors:
    target = None
    for km in maps:
      try:
        target = km.target(rename(name))
        break
      except KeyError:
        continue
    else:
      raise ValueError(f"checkpoint tensor {name!r} does not belong to this model")
    if target is None:
      continue
    if target.path not in out:
      raise ValueError(f"checkpoint tensor {name!r} maps to {target.path!r}, which this model config "
                       "does not have (a bias or head the config disables?)")
    value = to_jax_layout(np.asarray(array), target.hook)
    dest = out[target.path]
    want = dest.shape if target.layer is None else dest.shape[1:]
    if value.shape != want:
      raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(np.asarray(array).shape)}, "
                       f"the config expects {want} for {target.path} (after {target.hook or 'no'} transform)")
    if target.layer is None:
      dest[...] = value
    else:
      dest[target.layer] = value
    filled[target.path] = filled.get(target.path, 0) + 1
  missing = [p for p, a in out.items()
             if filled.get(p, 0) != (a.shape[0] if _stacked(p) else 1)
             and not p.endswith("encoder/embed_positions")]
  if missing:
    raise ValueError(f"checkpoint lacks tensors for {len(missing)} parameters, e.g. {missing[:5]}")
  for p in out:
    if p not in filled:  # sinusoidal positions absent from the file: keep the computed ones
      out[p] = current[p]
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(out, sep="/"))
  nnx.update(model, state)


def _stacked(path: str) -> bool:
  return "/layers/layers/" in path


def export_tensors(model: nnx.Module, maps: list[KeyMap]) -> Mapping[str, np.ndarray]:
  """HF name -> array (torch layout) for every parameter of `model`."""
  out = {}
  for path, array in flat_params(model).items():
    array = np.asarray(array)
    layers = array.shape[0] if _stacked(path) else None
    for km in maps:
      try:
        names = list(km.hf_names(path, layers))
        break
      except KeyError:
        continue
    else:
      raise ValueError(f"parameter {path!r} has no Hugging Face name in the key maps")
    for name, layer, hook in names:
      out[name] = np.ascontiguousarray(to_hf_layout(array if layer is None else array[layer], hook))
  return out
