"""What a `--llm` / `--whisper` path holds: a Hugging Face folder, a CTranslate2 Whisper folder or a GGUF file.

Every source offers the same face to `convert`:
  format                  "huggingface", "ctranslate2" or "gguf"
  config                  its Hugging Face config.json dict (read, or synthesized from the file)
  nbytes, tensors()       size on disk; (HF tensor name, array) pairs, one at a time
  tokenizer()             a transformers tokenizer, or None
  save_tokenizer_files(d) writes the tokenizer and generation_config.json into folder d
  save_feature_files(d)   (Whisper) writes preprocessor_config.json into folder d
"""

from __future__ import annotations

import os

from llasm_jax.convert.ct2 import MODEL_FILE, CT2Whisper, is_ct2_file
from llasm_jax.convert.gguf import GGUFCheckpoint, is_gguf_file
from llasm_jax.convert.reader import WEIGHT_FILES, CheckpointError, HFCheckpoint
from llasm_jax.errors import UserError

ACCEPTED = {
    "llm": "a Hugging Face LLaMA-family folder (config.json + *.safetensors or pytorch_model*.bin), a released "
           "LLaSM folder, or a GGUF file (or a folder holding one .gguf)",
    "whisper": "a Hugging Face Whisper folder (config.json + *.safetensors or pytorch_model*.bin) or a CTranslate2 "
               "Whisper folder (model.bin + config.json + tokenizer.json, as faster-whisper uses)",
}


def _has_hf_weights(folder: str) -> bool:
  return any(os.path.exists(os.path.join(folder, w)) or os.path.exists(os.path.join(folder, w + ".index.json"))
             for w in WEIGHT_FILES)


def open_source(path: str, role: str):
  """The source at `path` for `role` ("llm" or "whisper"), detected from what it holds."""
  if role not in ACCEPTED:
    raise UserError(f"role {role!r}: expected 'llm' or 'whisper'")
  flag = f"--{role}"
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: not a directory or file ({flag} takes {ACCEPTED[role]})")
  if os.path.isfile(path):
    if not is_gguf_file(path):
      raise CheckpointError(f"{path}: a file that is not GGUF; {flag} takes {ACCEPTED[role]}")
    return _for_role(GGUFCheckpoint(path), role, path)
  files = sorted(os.listdir(path))
  has_config = "config.json" in files
  if has_config and _has_hf_weights(path):
    return HFCheckpoint(path)
  if MODEL_FILE in files and is_ct2_file(os.path.join(path, MODEL_FILE)):
    return _for_role(CT2Whisper(path), role, path)
  if any(f.endswith(".gguf") for f in files):
    return _for_role(GGUFCheckpoint(path), role, path)
  if has_config:
    return HFCheckpoint(path)  # names the missing weight files
  shown = ", ".join(files[:8]) + (", ..." if len(files) > 8 else "") if files else "nothing"
  raise CheckpointError(f"{path}: no config.json, model.bin or .gguf file, so not a checkpoint this converter reads "
                        f"(it holds {shown}); {flag} takes {ACCEPTED[role]}")


def _for_role(source, role: str, path: str):
  is_whisper = isinstance(source, CT2Whisper)
  if is_whisper != (role == "whisper"):
    other = "whisper" if is_whisper else "llm"
    raise CheckpointError(f"{path}: a {source.format} {'Whisper' if is_whisper else 'LLM'} checkpoint given as "
                          f"--{role}; pass it with --{other} ({'--' + role} takes {ACCEPTED[role]})")
  return source
