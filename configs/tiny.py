r"""Tiny random LLaSM ("llasm" mode: Whisper encoder + decoder queries, linear adaptor) for smoke runs on CPU.

  llasm-jax forward --config configs/tiny.py
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "tiny"})
  # Pure data parallelism: the tiny model fits anywhere; -1 takes every device.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  return config
