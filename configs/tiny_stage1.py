r"""Tiny random LLaSM, stage 1 on synthetic data: CPU smoke runs, tests and the train benchmark.

  llasm-jax train --config configs/tiny_stage1.py --workdir /tmp/llasm_tiny_stage1
  XLA_FLAGS=--xla_force_host_platform_device_count=8 llasm-jax train --config configs/tiny_stage1.py \
      --workdir /tmp/llasm_tiny_stage1 --config.mesh.shape.data=2 --config.mesh.shape.fsdp=2 \
      --config.mesh.shape.tensor=2
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.train.sections import training_sections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "tiny"})
  config.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(1))
  config.train.steps = 20
  config.train.batch_size = 8
  config.train.log_every = 5
  config.train.checkpoint_every = 10
  config.optim.warmup_steps = 2
  config.data.seq_len = 48
  return config
