"""What every part agrees on about tokens: the ignored-label id, the audio markers, and one
tokenizer cache per process (data pipeline, dataset builds, evaluation)."""

from __future__ import annotations

import threading
from typing import Any

IGNORE = -100  # a label that is not a target (Hugging Face's convention)
AUDIO = "<audio>"  # where an audio goes in a conversation's text
AU_PATCH, AU_START, AU_END = "<au_patch>", "<au_start>", "<au_end>"
MARKERS = (AU_PATCH, AU_START, AU_END)  # appended to the vocab in this order (LLASM.md)

_TOKENIZERS: dict[str, Any] = {}
# grain's reader threads call the first sample together; transformers' lazy imports are not thread-safe.
LOAD_LOCK = threading.RLock()


def load_tokenizer(tokenizer):
  """A tokenizer object as it is, or the one of a folder (local or gs://) / hub name, loaded
  once per process."""
  if not isinstance(tokenizer, str):
    return tokenizer
  with LOAD_LOCK:
    if tokenizer not in _TOKENIZERS:
      from transformers import AutoTokenizer

      from llasm_jax import checkpoint, paths

      # A model folder in a bucket: its tokenizer files, downloaded (transformers reads local files).
      local = checkpoint.companions(tokenizer) if paths.is_remote(tokenizer) else tokenizer
      _TOKENIZERS[tokenizer] = AutoTokenizer.from_pretrained(local)
    return _TOKENIZERS[tokenizer]
