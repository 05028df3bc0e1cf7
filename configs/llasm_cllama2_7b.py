r"""LLaSM-Cllama2 as released: Whisper large-v2 (encoder + decoder) + linear adaptor + Chinese-LLaMA-2-7B.

  llasm-jax forward --config configs/llasm_cllama2_7b.py --batch 8
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "llasm_cllama2"})
  # bfloat16 matmuls, float32 master weights (the optimizer updates them in float32).
  precision = {"dtype": "bfloat16", "param_dtype": "float32"}
  config.model.audio = ml_collections.ConfigDict(precision)
  config.model.llm = ml_collections.ConfigDict(precision)
  # FSDP over every device: 7B + Whisper large in float32 do not fit one accelerator.
  # tensor stays 1 because the vocab (32003) does not divide by a larger tensor axis.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  return config
