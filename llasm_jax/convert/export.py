"""`llasm-jax export`: a llasm_jax model folder -> Hugging Face folders.

  llm/      a standard `LlamaForCausalLM` (or Qwen2) folder, loadable by AutoModelForCausalLM
  whisper/  a `WhisperForConditionalGeneration` folder (encoder only for "encoder"-mode models),
            with Whisper's tokenizer and generation config when the model folder has them
  llasm/    LLaSM models only: the released layout (`model_type: "llaaa"`, `model.mm_projector.*`
            in the LLM checkpoint), which `llasm-jax convert --llm llasm/ --whisper whisper/` reads back;
            an "encoder"-mode model's adaptor is `model.audio_adaptor.*` there, its kind (mlp or ultravox)
            in config.json's `llasm_jax_adaptor`
  lora/     a model with LoRA factors, `lora="peft"` (the default): a PEFT adapter of llm/, which then
            holds the base weights; `lora="merge"`: no lora/, llm/ holds W + (alpha / r) B A. llasm/
            always holds the merged weights (its layout has no place for an adapter).
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from llasm_jax import checkpoint, paths
from llasm_jax.convert.configs import llama_config_to_hf, whisper_config_to_hf
from llasm_jax.checkpoint import FEATURE_FILES, TOKENIZER_FILES
from llasm_jax.checkpoint import HF_LLM_CONFIG, HF_WHISPER_CONFIG
from llasm_jax.convert import peft
from llasm_jax.tokens import MARKERS
from llasm_jax.convert.hf import iter_hf_tensors, keymaps
from llasm_jax.errors import UserError

DEFAULT_SHARD_BYTES = 4 << 30
LORA_EXPORTS = ("peft", "merge")  # how a model's LoRA factors leave: a PEFT adapter, or merged into llm/


def write_safetensors(folder: str, tensors: Iterable[tuple[str, np.ndarray]], shard_bytes: int) -> int:
  """Writes `model.safetensors` or `model-0000k-of-0000n.safetensors` + index; returns bytes."""
  os.makedirs(folder, exist_ok=True)
  shards, current, size, total = [], {}, 0, 0

  def flush():
    nonlocal current, size
    if current:
      name = f"part-{len(shards):05d}.safetensors"
      save_file(current, os.path.join(folder, name), metadata={"format": "pt"})
      shards.append((name, list(current)))
      current, size = {}, 0

  for name, array in tensors:
    if size and size + array.nbytes > shard_bytes:
      flush()
    current[name] = array
    size += array.nbytes
    total += array.nbytes
  flush()
  if len(shards) == 1:
    os.rename(os.path.join(folder, shards[0][0]), os.path.join(folder, "model.safetensors"))
    return total
  weight_map = {}
  for i, (tmp, names) in enumerate(shards):
    final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    os.rename(os.path.join(folder, tmp), os.path.join(folder, final))
    weight_map.update({n: final for n in names})
  paths.write_json(os.path.join(folder, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
  return total


def _hf_config(ckpt: str, source_name: str, ours: dict) -> dict:
  """The source checkpoint's config.json (if converted from one) updated with our fields."""
  path = paths.resolve(ckpt) / source_name
  base = paths.read_json(path) if path.exists() else {}
  for key in ("model_type", "architectures", "mm_audio_tower", "mm_hidden_size", "audio_token_len", "use_mm_proj",
              "rope_scaling", "rope_parameters", "attention_bias", "llasm_jax_mode", "llasm_jax_adaptor"):
    base.pop(key, None)
  out = {**base, **ours}
  # LlamaConfig keeps one EOS id; a source listing several (Llama 3) keeps its list.
  if isinstance(base.get("eos_token_id"), list) and ours.get("eos_token_id") in base["eos_token_id"]:
    out["eos_token_id"] = base["eos_token_id"]
  return out


def export(ckpt: str, out: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
           progress: bool = True, lora: str = "peft") -> dict[str, int]:
  """Writes the HF folders of the model in `ckpt` under `out`; returns bytes per folder.

  `ckpt` and `out` may be in a bucket: safetensors are written to local files first (a staging
  folder when `out` is remote) and uploaded with each folder's config.json last. `lora`: what
  becomes of LoRA factors, one of LORA_EXPORTS (see the module docstring)."""
  if lora not in LORA_EXPORTS:
    raise UserError(f"lora={lora!r}: expected one of {LORA_EXPORTS}")
  meta = checkpoint.read_meta(ckpt)
  kind = meta["kind"]
  cfg = checkpoint.config_from_dict(kind, meta["config"])
  if kind == "llasm" and cfg.mode == "decoder":
    raise UserError(f"{ckpt}: a 'decoder'-mode model's adaptor and token bridge have no Hugging Face layout (the "
                     "released LLaSM layout holds one mm_projector); share the model folder itself")
  params, factors = peft.split_lora(checkpoint.load_params_numpy(ckpt))
  merged = peft.Merged(params, factors, checkpoint.lora_of(kind, cfg))
  adapter = bool(factors) and lora == "peft"
  written = {}
  bar = tqdm(total=sum(a.nbytes for a in params.values()), unit="B", unit_scale=True, desc="export",
             disable=not progress)

  def counted(stream):
    for name, array in stream:
      bar.update(array.nbytes)
      yield name, array

  markers = [f"{part}/config.json" for part in ("llm", "whisper", "llasm")]
  markers.append(f"{peft.ADAPTER_DIR}/{peft.ADAPTER_CONFIG}")
  with checkpoint.atomic_dir(out, overwrite=overwrite) as target, paths.staged(target, last=markers) as tmp:
    if kind in ("llama", "llasm"):
      lcfg = cfg if kind == "llama" else cfg.llm
      prefix = "" if kind == "llama" else "llm/"
      maps = keymaps("llama") if kind == "llama" else keymaps("llasm", cfg.mode)
      folder = os.path.join(tmp, "llm")
      llm = params if adapter else merged
      written["llm"] = write_safetensors(folder, counted(iter_hf_tensors(llm, maps, prefix)), shard_bytes)
      paths.write_json(os.path.join(folder, "config.json"), _hf_config(ckpt, HF_LLM_CONFIG, llama_config_to_hf(lcfg)))
      paths.copy_files(ckpt, folder, TOKENIZER_FILES)
      if adapter:
        written[peft.ADAPTER_DIR] = peft.write_adapter(
            os.path.join(tmp, peft.ADAPTER_DIR), factors, maps, prefix, lcfg.lora, paths.join(out, "llm"))
    if kind in ("whisper", "llasm"):
      wcfg = cfg if kind == "whisper" else cfg.audio
      maps = keymaps("whisper") if kind == "whisper" else keymaps("llasm", cfg.mode)
      prefix = "" if kind == "whisper" else "audio/"
      folder = os.path.join(tmp, "whisper")
      stream = (("model." + n, a) for n, a in iter_hf_tensors(params, maps, prefix))
      written["whisper"] = write_safetensors(folder, counted(stream), shard_bytes)
      paths.write_json(os.path.join(folder, "config.json"),
                  _hf_config(ckpt, HF_WHISPER_CONFIG, whisper_config_to_hf(wcfg)))
      paths.copy_files(ckpt, folder, FEATURE_FILES)
      # Whisper's own tokenizer and generation config, so the folder transcribes as it is.
      paths.copy_files(paths.join(ckpt, checkpoint.WHISPER_DIR), folder, checkpoint.WHISPER_FILES)
    if kind == "llasm":
      folder = os.path.join(tmp, "llasm")
      maps = keymaps("llasm", cfg.mode)
      stream = (t for prefix in ("llm/", "adaptor/") for t in iter_hf_tensors(merged, maps, prefix))
      written["llasm"] = write_safetensors(folder, stream, shard_bytes)
      hf = _hf_config(ckpt, HF_LLM_CONFIG, llama_config_to_hf(cfg.llm))
      hf.update(architectures=["LlaaaLlamaForCausalLM"], model_type="llaaa", mm_audio_tower="../whisper",
                mm_hidden_size=cfg.audio.d_model, audio_token_len=cfg.audio_token_len, use_mm_proj=True,
                llasm_jax_mode=cfg.mode, llasm_jax_stack_factor=cfg.stack_factor,
                llasm_jax_adaptor_hidden=cfg.adaptor_hidden, llasm_jax_adaptor=cfg.adaptor)
      paths.write_json(os.path.join(folder, "config.json"), hf)
      paths.copy_files(ckpt, folder, TOKENIZER_FILES)
      ids = (cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id)
      added_path = os.path.join(folder, "added_tokens.json")
      added = paths.read_json(added_path) if os.path.exists(added_path) else {}
      added.update(dict(zip(MARKERS, ids)))
      paths.write_json(added_path, added)
  bar.close()
  return written
