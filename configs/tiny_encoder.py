r"""Tiny random LLaSM in "encoder" mode (Whisper encoder only, unpadded audio, stacked MLP adaptor).

  llasm-jax forward --config configs/tiny_encoder.py --seconds 3
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "tiny_encoder"})
  config.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  return config
