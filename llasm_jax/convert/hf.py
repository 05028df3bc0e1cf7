"""Hugging Face state dicts <-> llasm_jax parameter trees, through the per-family key maps."""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import numpy as np
from flax import nnx, traverse_util

from llasm_jax.convert.keymap import (
    LINEAR_ADAPTOR_RULES, LLAMA_IGNORED, LLAMA_RULES, MLP_ADAPTOR_RULES, WHISPER_IGNORED, WHISPER_RULES, KeyMap,
    to_hf_layout, to_jax_layout)
from llasm_jax.errors import UserError

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
    if mode == "decoder":  # a fresh adaptor and bridge (`convert`); no Hugging Face layout holds them
      return [KeyMap(LLAMA_RULES, "llm/", LLAMA_IGNORED), KeyMap(WHISPER_RULES, "audio/", WHISPER_IGNORED)]
    return [KeyMap(LLAMA_RULES, "llm/", LLAMA_IGNORED), KeyMap(MLP_ADAPTOR_RULES, "adaptor/"),
            KeyMap(WHISPER_RULES, "audio/", WHISPER_IGNORED + [_WHISPER_DECODER])]
  raise UserError(f"unknown model kind {kind!r}: expected 'llama', 'whisper' or 'llasm'")


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """Slash-joined parameter path -> array, for every variable of `model`."""
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep="/")


def fill_params(dest: dict[str, np.ndarray], tensors: Iterable[tuple[str, np.ndarray]], maps: list[KeyMap],
                *, rename=lambda n: n, on_tensor=None) -> dict[str, int]:
  """Copies (HF name, array) pairs into the preallocated `dest` (path -> array), casting to its dtype.

  Returns how many tensors each path received. Raises on a tensor that maps nowhere or to a
  parameter the config lacks, and on a shape that disagrees with the config (naming the tensor).
  """
  filled: dict[str, int] = {}
  for name, array in tensors:
    if on_tensor is not None:
      on_tensor(name, array)
    target = None
    for km in maps:
      try:
        target = km.target(rename(name))
        break
      except KeyError:
        continue
    else:
      raise UserError(f"checkpoint tensor {name!r} does not belong to this model")
    if target is None:
      continue
    if target.path not in dest:
      raise UserError(f"checkpoint tensor {name!r} maps to {target.path!r}, which this model config "
                       "does not have (a bias or head the config disables?)")
    value = to_jax_layout(np.asarray(array), target.hook)
    out = dest[target.path]
    want = out.shape if target.layer is None else out.shape[1:]
    if value.shape != want:
      raise UserError(f"checkpoint tensor {name!r} has shape {tuple(np.asarray(array).shape)}, "
                       f"the config expects {want} for {target.path} (after {target.hook or 'no'} transform)")
    if target.layer is None:
      out[...] = value
    else:
      out[target.layer] = value
    filled[target.path] = filled.get(target.path, 0) + 1
  return filled


def check_complete(dest: dict[str, np.ndarray], filled: dict[str, int], optional=()) -> None:
  """Raises unless every parameter (every layer slot of stacked ones) was filled once."""
  missing = [p for p, a in dest.items()
             if filled.get(p, 0) != (a.shape[0] if _stacked(p) else 1) and p not in optional]
  if missing:
    raise UserError(f"checkpoint lacks tensors for {len(missing)} parameters, e.g. {missing[:5]}")


def load_tensors(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], maps: list[KeyMap],
                 *, rename=lambda n: n) -> None:
  """Fills every parameter of `model` from (HF name, array) pairs; strict both ways."""
  current = flat_params(model)
  dest = {p: np.empty(a.shape, a.dtype) for p, a in current.items()}
  filled = fill_params(dest, tensors, maps, rename=rename)
  # Whisper's sinusoidal positions are fixed: files without them keep the computed values.
  positions = [p for p in dest if p.endswith("encoder/embed_positions") and p not in filled]
  check_complete(dest, filled, optional=positions)
  for p in positions:
    dest[p] = np.asarray(current[p])
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(dest, sep="/"))
  nnx.update(model, state)


def _stacked(path: str) -> bool:
  return "/layers/layers/" in path


def iter_hf_tensors(params: Mapping[str, np.ndarray], maps: list[KeyMap],
                    prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, torch-layout array) for the parameters under `prefix`, produced lazily."""
  for path, array in params.items():
    if not path.startswith(prefix):
      continue
    array = np.asarray(array)
    layers = array.shape[0] if _stacked(path) else None
    for km in maps:
      try:
        names = list(km.hf_names(path, layers))
        break
      except KeyError:
        continue
    else:
      raise UserError(f"parameter {path!r} has no Hugging Face name in the key maps")
    for name, layer, hook in names:
      yield name, np.ascontiguousarray(to_hf_layout(array if layer is None else array[layer], hook))


def export_tensors(params: nnx.Module | Mapping[str, np.ndarray], maps: list[KeyMap]) -> dict[str, np.ndarray]:
  """HF name -> array (torch layout) for every parameter of a model or flat parameter dict."""
  return dict(iter_hf_tensors(flat_params(params) if isinstance(params, nnx.Module) else params, maps))
