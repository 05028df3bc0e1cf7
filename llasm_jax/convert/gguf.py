"""GGUF LLaMA-family files (llama.cpp's format) -> Hugging Face tensors, config and tokenizer, one tensor at a time.

Read through `transformers`' GGUF support: `load_gguf_checkpoint` for the config and tokenizer
metadata, its per-architecture tensor processor (which undoes llama.cpp's q/k row permutation,
giving the rotate-half RoPE layout of HF checkpoints) and GGUF -> HF name map, and
`AutoTokenizer.from_pretrained(folder, gguf_file=...)` for the tokenizer and chat template.
Unlike `load_gguf_checkpoint(return_tensors=True)`, which returns every tensor at once, each
tensor is dequantized to float32 from the memory-mapped file only when it is consumed, so a
conversion holds the float32 model once (the output) plus one tensor.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from llasm_jax.convert.reader import CheckpointError, MadeTokenizerFiles
from llasm_jax.models.llama import RopeScaling, llama3_inv_freq

# GGUF `general.architecture` -> what it holds; llama.cpp stores Mistral as "llama".
SUPPORTED = {"llama": "LLaMA-1/2/3, Mistral", "qwen2": "Qwen2"}


def find_gguf(path: str) -> str:
  """`path` itself if a file, else the one `.gguf` file inside the folder `path`."""
  if os.path.isfile(path):
    return path
  found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
  if len(found) != 1:
    raise CheckpointError(f"{path}: holds {len(found)} .gguf files {found[:6]}; pass the one to convert as the path")
  return os.path.join(path, found[0])


def is_gguf_file(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(4) == b"GGUF"
  except OSError:
    return False


def hf_parameter_names(layers: int) -> list[str]:
  """Every parameter name of a Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` with `layers`
  layers (Qwen2's q/k/v biases included; a name the file lacks is simply not looked up). Written
  out instead of listed from a model on PyTorch's meta device (seconds per conversion)."""
  per_layer = [f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")]
  per_layer += ["self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
  per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
  return (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
          + [f"model.layers.{i}.{name}" for i in range(layers) for name in per_layer])


class GGUFCheckpoint(MadeTokenizerFiles):
  """A GGUF LLaMA-family LLM as a conversion source: `config` is its HF config.json dict."""

  format = "gguf"

  def __init__(self, path: str):
    self.path = path
    self.file = os.path.abspath(find_gguf(path))
    self.folder = os.path.dirname(self.file)
    if not is_gguf_file(self.file):
      raise CheckpointError(f"{path}: does not start with the GGUF magic bytes, so not a GGUF file")
    try:
      import torch  # noqa: F401  (transformers reads GGUF metadata and tokenizers only with PyTorch installed)
      from gguf import GGUFReader
      from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as e:
      raise CheckpointError(f"{path}: reading GGUF needs the gguf package and PyTorch ({e}); "
                            "pip install gguf 'llasm_jax[torch]'") from None
    reader = GGUFReader(self.file)
    # The few metadata values used later; the reader itself is dropped at the end of __init__:
    # its parsed fields (a Python object per vocabulary token and merge) weigh ~150 MiB for a
    # 49k vocabulary, and only the tensor views (into the memory-mapped file) are needed.
    self._fields = {k: reader.fields[k].contents() for k in reader.fields
                    if not k.startswith("tokenizer.ggml.") or k.endswith("_token_id")}
    self._tensors = list(reader.tensors)
    del reader
    arch = self._field("general.architecture")
    if arch not in SUPPORTED:
      raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items()))
    self.arch = arch
    parsed = load_gguf_checkpoint(self.file, return_tensors=False)
    self.config = self._hf_config(parsed)
    self._tokenizer = None

  def _field(self, key: str, default=None):
    return self._fields.get(key, default)

  def _hf_config(self, parsed: dict) -> dict[str, Any]:
    config = {k: v for k, v in parsed["config"].items() if not k.startswith("_")}
    config["architectures"] = [{"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(
        config["model_type"], "LlamaForCausalLM")]
    tok = parsed.get("tokenizer", {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if key not in config and key in tok:
        config[key] = tok[key]
    rope = self._rope_scaling(config)
    if rope:
      config["rope_scaling"] = rope
    return config

  def _rope_scaling(self, config: dict) -> dict | None:
    """RoPE scaling, which transformers' GGUF config mapping leaves out: a `rope.scaling.type`
    key (linear) or llama.cpp's `rope_freqs` tensor of per-frequency divisors (Llama 3.1),
    from which the llama3 parameters are recovered and checked."""
    kind = self._field(f"{self.arch}.rope.scaling.type")
    factor = self._field(f"{self.arch}.rope.scaling.factor")
    original = int(self._field(f"{self.arch}.rope.scaling.original_context_length", 8192))
    if kind not in (None, "none") and factor not in (None, 1.0):
      if kind != "linear":
        raise CheckpointError(f"{self.path}: RoPE scaling {kind!r} is not supported (only linear and llama3)")
      return {"rope_type": "linear", "factor": float(factor)}
    tensors = {t.name: t for t in self._tensors}
    if "rope_freqs.weight" not in tensors:
      return None
    divisors = np.asarray(tensors["rope_freqs.weight"].data, np.float32)
    if np.allclose(divisors, 1.0):
      return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    inv_freq = (1.0 / config.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    rope = dict(rope_type="llama3", factor=float(divisors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=original)
    # llama.cpp stores Llama 3 scaling as per-frequency divisors (what its HF -> GGUF converter writes).
    expected = inv_freq / np.asarray(llama3_inv_freq(inv_freq, RopeScaling(**rope)))
    if divisors.shape != inv_freq.shape or not np.allclose(expected, divisors, rtol=1e-4):
      raise CheckpointError(f"{self.path}: its rope_freqs tensor is not Llama 3 RoPE scaling with factor "
                            f"{rope['factor']}, low/high frequency factors 1/4 and original context {original}; "
                            "convert the Hugging Face folder of this model instead")
    return rope

  @property
  def nbytes(self) -> int:
    """Bytes `tensors()` yields (float32), which a progress bar counts."""
    return sum(4 * int(np.prod(t.shape)) for t in self._tensors if t.name != "rope_freqs.weight")

  def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
    """(HF `LlamaForCausalLM` / `Qwen2ForCausalLM` name, float32 array), dequantized one at a time."""
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=self.config)
    names = self._name_map(processor)
    for tensor in self._tensors:
      if tensor.name == "rope_freqs.weight":  # read into the config's rope scaling
        continue
      array = dequantize(tensor.data, tensor.tensor_type)
      result = processor.process(weights=array, name=tensor.name, tensor_key_mapping=names, parsed_parameters={})
      if result.name not in names:
        raise CheckpointError(f"{self.path}: GGUF tensor {tensor.name!r} has no Hugging Face {self.arch} name; "
                              "the file holds parts this converter does not know")
      yield names[result.name], np.asarray(result.weights, np.float32)

  def _name_map(self, processor) -> dict[str, str]:
    """GGUF tensor name -> HF name, as `transformers.get_gguf_hf_weights_map` pairs them (gguf's
    tensor-name table applied to the HF model's parameter names), built once: that function
    rebuilds the table for every submodule, ~10 s for a 30-layer model."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == self.arch)
    table = get_tensor_name_map(arch, self.config["num_hidden_layers"])
    names = {}
    for hf in hf_parameter_names(self.config["num_hidden_layers"]):
      hf = processor.preprocess_name(hf)
      base, _, suffix = hf.rpartition(".")
      gguf_name = table.get_name(base)
      if gguf_name is not None:
        names[f"{gguf_name}.{suffix}"] = hf
    return names

  def tokenizer(self):
    """The transformers tokenizer built from the GGUF metadata (vocabulary, merges, chat template)."""
    if self._tokenizer is None:
      from transformers import AutoTokenizer

      self._tokenizer = AutoTokenizer.from_pretrained(self.folder, gguf_file=os.path.basename(self.file))
    return self._tokenizer

  def generation_config(self) -> dict[str, Any]:
    """BOS / EOS / PAD; llama.cpp's end-of-turn and end-of-message ids also end a reply."""
    eos = [self.config.get("eos_token_id")]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
      eos.append(self._field(key))
    eos = list(dict.fromkeys(int(i) for i in eos if i is not None))
    out = {"bos_token_id": self.config.get("bos_token_id"), "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if self.config.get("pad_token_id") is not None:
      out["pad_token_id"] = self.config["pad_token_id"]
    return out
