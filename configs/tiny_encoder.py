r"""Tiny random LLaSM in "encoder" mode (Whisper encoder only, unpadded audio, stacked MLP adaptor).

  llasm-jax forward --config configs/tiny_encoder.py --seconds 3

A model to run (forward, generate), without training sections: it takes no argument; train
encoder mode with configs/tiny.py:stage1 --config.model.preset=tiny_encoder (and shorter
--config.data.mel_frames) or from a model folder.
"""

import ml_collections

from llasm_jax.errors import UserError
from llasm_jax.sharding import DEFAULT_RULES


def get_config(arg: str | None = None):
  if arg is not None:
    raise UserError(f"configs/tiny_encoder.py takes no argument (got {arg!r}): it is a model to run, not a training run")
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "tiny_encoder"})
  config.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  return config
