"""Reads Hugging Face checkpoint folders one tensor at a time (safetensors or torch `.bin`).

Nothing loads a whole checkpoint: safetensors files are memory-mapped and each tensor copied
out on its own; `.bin` files (Python pickles) are opened with `torch.load(..., mmap=True,
weights_only=True)`, which refuses arbitrary code, and also read tensor by tensor.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from llasm_jax.checkpoint import FEATURE_FILES, WHISPER_FILES
from llasm_jax.paths import copy_files
from llasm_jax.errors import UserError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(UserError):
  """A folder that is not a usable checkpoint; the message names the file and the fix."""


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: missing") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class HFCheckpoint:
  """A Hugging Face model folder: `config.json` plus single or sharded weight files."""

  format = "huggingface"

  def __init__(self, folder: str):
    self.path = folder
    self.folder = os.path.abspath(folder)
    if not os.path.isdir(self.folder):
      raise CheckpointError(f"{folder}: not a directory")
    if not os.path.exists(os.path.join(self.folder, "config.json")):
      raise CheckpointError(f"{folder}: no config.json, so not a Hugging Face checkpoint folder")
    self.config = read_json(os.path.join(self.folder, "config.json"))
    self.files = self._weight_files()

  def _weight_files(self) -> list[str]:
    for single in WEIGHT_FILES:
      index = os.path.join(self.folder, single + ".index.json")
      if os.path.exists(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
          raise CheckpointError(f"{index}: empty weight_map")
        missing = [s for s in shards if not os.path.exists(os.path.join(self.folder, s))]
        if missing:
          raise CheckpointError(f"{self.folder}: missing shard files {missing} listed in {os.path.basename(index)}; "
                                "download or copy all shards")
        return [os.path.join(self.folder, s) for s in shards]
      if os.path.exists(os.path.join(self.folder, single)):
        return [os.path.join(self.folder, single)]
    raise CheckpointError(f"{self.folder}: no weights (expected one of {', '.join(WEIGHT_FILES)} "
                          "or a sharded *.index.json)")

  @property
  def nbytes(self) -> int:
    return sum(os.path.getsize(f) for f in self.files)

  def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs, one at a time, in file order; bf16 comes back as ml_dtypes.bfloat16."""
    for path in self.files:
      if path.endswith(".safetensors"):
        yield from _safetensors(path)
      else:
        yield from _torch_bin(path)

  def tokenizer(self):
    """The folder's transformers tokenizer, or None when it has no tokenizer files."""
    if not any(os.path.exists(os.path.join(self.folder, f)) for f in ("tokenizer.model", "tokenizer.json",
                                                                       "vocab.json")):
      return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(self.folder)

  def save_tokenizer_files(self, dst: str) -> None:
    """Copies the tokenizer files and generation_config.json that `dst` lacks."""
    copy_files(self.folder, dst, WHISPER_FILES)

  def save_feature_files(self, dst: str) -> None:
    copy_files(self.folder, dst, FEATURE_FILES)


def _safetensors(path: str):
  from safetensors import safe_open

  try:
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        yield name, f.get_tensor(name)
  except Exception as e:  # safetensors raises its own error types for truncated files
    if isinstance(e, GeneratorExit):
      raise
    raise CheckpointError(f"{path}: cannot read ({e}); the file may be truncated") from e


def _torch_bin(path: str):
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path}: reading .bin checkpoints needs PyTorch: pip install 'llasm_jax[torch]'") from None
  try:
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True) ({e})") from e
  for name in list(state):
    t = state.pop(name)
    if t.dtype == torch.bfloat16:
      import ml_dtypes

      yield name, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      yield name, t.numpy()
    del t


class MadeTokenizerFiles:
  """For sources whose tokenizer and generation config are built from the file (CT2, GGUF), not
  copied: they need `tokenizer()` and `generation_config()`."""

  def save_tokenizer_files(self, dst: str) -> None:
    """Writes the tokenizer (with its chat template) and `generation_config.json` into `dst`,
    keeping the files `dst` already has (e.g. a tokenizer with the audio tokens added)."""
    os.makedirs(dst, exist_ok=True)
    if not os.path.exists(os.path.join(dst, "tokenizer_config.json")):
      self.tokenizer().save_pretrained(dst)
    gen = os.path.join(dst, "generation_config.json")
    if not os.path.exists(gen):
      with open(gen, "w") as f:
        json.dump(self.generation_config(), f, indent=2)
