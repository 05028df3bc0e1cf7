r"""Tiny random LLaSM ("llasm" mode: Whisper encoder + decoder queries, linear adaptor): CPU smoke runs, tests and the train benchmark.

  llasm-jax forward --config configs/tiny.py
  llasm-jax train --config configs/tiny.py:stage1 --workdir /tmp/llasm_tiny_stage1
  llasm-jax train --config configs/tiny.py:stage2 --workdir /tmp/llasm_tiny_stage2
  XLA_FLAGS=--xla_force_host_platform_device_count=8 llasm-jax train --config configs/tiny.py:stage2 \
      --workdir /tmp/llasm_tiny_stage2 --config.mesh.shape.data=2 --config.mesh.shape.fsdp=2 \
      --config.mesh.shape.tensor=2

arg: "stage1" (the default: only the adaptor trains) or "stage2" (the adaptor and the LLM), on synthetic data.
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.train.sections import stage_of, training_sections


def get_config(arg: str = "stage1"):
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "tiny"})
  # Pure data parallelism: the tiny model fits anywhere; -1 takes every device.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(stage_of(arg)))
  config.train.steps = 20
  config.train.batch_size = 8
  config.train.log_every = 5
  config.train.checkpoint_every = 10
  config.optim.warmup_steps = 2
  config.data.seq_len = 48
  return config
