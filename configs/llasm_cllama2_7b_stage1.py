r"""LLaSM-Cllama2 (Whisper large-v2 + Chinese-Llama-2-7B shape), stage 1, on a TPU pod or GPU cluster.

  llasm-jax train --config configs/llasm_cllama2_7b_stage1.py --workdir gs://BUCKET/llasm_stage1 \
      --config.train.init_from=/ckpt/llasm_fresh \
      --config.data.source=tfds --config.data.dir=/data/asr
  (launch/tpu.sh run and launch/gpu_slurm.sh run it on every host.)
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.train.sections import training_sections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      "preset": "llasm_cllama2",
      "llm": {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "dots_no_batch"},
      "audio": {"dtype": "bfloat16", "param_dtype": "float32"},
  })
  # FSDP over every device: 7B float32 master weights plus Adam moments need sharding.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(1))
  config.train.steps = 20000
  config.train.batch_size = 256
  config.data.seq_len = 256
  return config
