"""LoRA factors of a model folder -> a PEFT adapter folder, or merged into the kernels of an HF export.

Legend: L layers, I input features, O output features, R the LoRA rank.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained("OUT/llm"), "OUT/lora")` loads.
PEFT names each factor after the HF module it adapts, under `base_model.model.`:
`...model.layers.0.self_attn.q_proj.lora_A.weight` float[R, I] is our lora_a^T (we keep [in, out]
like the kernels, torch keeps [out, in]) and `...lora_B.weight` float[O, R] is our lora_b^T, so
they go through the kernels' own key map and "linear" hook. Merged: W + (alpha / R) A B, in our
layout, before the same hook transposes it.
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping

import numpy as np
from safetensors.numpy import save_file

from llasm_jax import paths
from llasm_jax.convert.hf import iter_hf_tensors
from llasm_jax.convert.keymap import KeyMap
from llasm_jax.layers.lora import LORA_FACTORS, LoraConfig, is_lora_path
from llasm_jax.errors import UserError

ADAPTER_DIR = "lora"  # OUT/lora/, next to OUT/llm/
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM's path to the wrapped model
PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}


def split_lora(params: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(every parameter but the LoRA factors, the factors), both slash-joined path -> array."""
  return ({p: a for p, a in params.items() if not is_lora_path(p)},
          {p: a for p, a in params.items() if is_lora_path(p)})


def _kernel(factor_path: str) -> str:
  return factor_path.rsplit("/", 1)[0] + "/kernel"


class Merged(Mapping):
  """`base` with W + scale * A B in place of each kernel that has factors, computed on access (one
  stacked kernel at a time, so an export never holds a second copy of the model)."""

  def __init__(self, base: Mapping[str, np.ndarray], factors: Mapping[str, np.ndarray], lora: LoraConfig):
    self.base, self.factors, self.scale = base, factors, lora.scale
    self.adapted = {_kernel(p) for p in factors}

  def __getitem__(self, path: str) -> np.ndarray:
    kernel = np.asarray(self.base[path])
    if path not in self.adapted:
      return kernel
    module = path.rsplit("/", 1)[0]
    a, b = (np.asarray(self.factors[f"{module}/{n}"], np.float32) for n in LORA_FACTORS)
    update = np.einsum("...ir,...ro->...io", a, b)  # float[L, I, O] for stacked layers, [I, O] else
    return (kernel.astype(np.float32) + self.scale * update).astype(kernel.dtype)

  def __iter__(self):
    return iter(self.base)

  def __len__(self) -> int:
    return len(self.base)


def adapter_tensors(factors: Mapping[str, np.ndarray], maps: list[KeyMap],
                    prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
  """(PEFT name, torch-layout array) of every factor under `prefix`: each factor goes through the
  key map as if it were its kernel, which gives the HF weight name and the transpose."""
  for path, array in factors.items():
    if not path.startswith(prefix):
      continue
    factor = path.rsplit("/", 1)[1]
    for name, tensor in iter_hf_tensors({_kernel(path): array}, maps, prefix):
      yield f"{PEFT_PREFIX}{name.removesuffix('.weight')}.{PEFT_NAMES[factor]}.weight", tensor


def adapter_config(lora: LoraConfig, base_model: str) -> dict:
  """PEFT's `adapter_config.json` of `lora` (a plain LoRA: no bias, no rsLoRA/DoRA, every layer)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": list(lora.targets),
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
  }


def write_adapter(folder: str, factors: Mapping[str, np.ndarray], maps: list[KeyMap], prefix: str, lora: LoraConfig,
                  base_model: str) -> int:
  """Writes the adapter folder (local) of the factors under `prefix`; returns its tensor bytes."""
  tensors = dict(adapter_tensors(factors, maps, prefix))
  if not tensors:
    raise UserError(f"no LoRA factors under {prefix!r} to write an adapter from")
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  paths.write_json(os.path.join(folder, ADAPTER_CONFIG), adapter_config(lora, base_model))
  return sum(t.nbytes for t in tensors.values())
