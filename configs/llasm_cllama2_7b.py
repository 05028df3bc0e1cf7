r"""LLaSM-Cllama2 as released: Whisper large-v2 (encoder + decoder) + linear adaptor + Chinese-LLaMA-2-7B, on a TPU pod or GPU cluster.

  llasm-jax forward --config configs/llasm_cllama2_7b.py --batch 8
  llasm-jax train --config configs/llasm_cllama2_7b.py:stage1 --workdir gs://BUCKET/llasm_stage1 \
      --config.train.init_from=/ckpt/llasm_fresh \
      --config.data.source=tfds --config.data.dir=/data/asr
  llasm-jax train --config configs/llasm_cllama2_7b.py:stage2 --workdir gs://BUCKET/llasm_stage2 \
      --config.train.init_from=gs://BUCKET/llasm_stage1/model \
      --config.data.source=tfds --config.data.dir=/data/instructions
  (launch/tpu.sh run and launch/gpu_slurm.sh run it on every host.)

arg: "stage1" (the default: only the adaptor trains) or "stage2" (the adaptor and the LLM).
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.train.sections import stage_of, training_sections


def get_config(arg: str = "stage1"):
  stage = stage_of(arg)
  config = ml_collections.ConfigDict()
  # bfloat16 matmuls, float32 master weights (the optimizer updates them in float32); stage 2
  # recomputes each whole LLM layer in the backward pass, stage 1 keeps its matmul outputs.
  config.model = ml_collections.ConfigDict({
      "preset": "llasm_cllama2",
      "llm": {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "dots_no_batch" if stage == 1 else "full"},
      "audio": {"dtype": "bfloat16", "param_dtype": "float32"},
  })
  # FSDP over every device: 7B float32 master weights plus Adam moments need sharding.
  # tensor stays 1 because the vocab (32003) does not divide by a larger tensor axis.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(stage))
  config.train.steps = 20000 if stage == 1 else 30000
  config.train.batch_size = 256 if stage == 1 else 128
  config.data.seq_len = 256 if stage == 1 else 2048
  return config
