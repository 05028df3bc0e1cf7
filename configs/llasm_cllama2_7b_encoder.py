r"""LLaSM-Cllama2 sizes in "encoder" mode: Whisper large-v2 encoder only, 8 frames stacked, MLP adaptor, LLaMA-2-7B.

  llasm-jax forward --config configs/llasm_cllama2_7b_encoder.py --batch 8 --seconds 12

A model to run (forward, generate), without training sections: it takes no argument; train
encoder mode with configs/llasm_cllama2_7b.py:stage1 --config.model.preset=llasm_cllama2_encoder.
"""

import ml_collections

from llasm_jax.errors import UserError
from llasm_jax.sharding import DEFAULT_RULES


def get_config(arg: str | None = None):
  if arg is not None:
    raise UserError(f"configs/llasm_cllama2_7b_encoder.py takes no argument (got {arg!r}): it is a model to run, not a training run")
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "llasm_cllama2_encoder"})
  precision = {"dtype": "bfloat16", "param_dtype": "float32"}
  config.model.audio = ml_collections.ConfigDict(precision)
  config.model.llm = ml_collections.ConfigDict(precision)
  config.mesh = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  return config
