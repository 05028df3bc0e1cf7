r"""LLaSM on Qwen2.5-7B with the Whisper large-v3 encoder ("encoder" mode), stage 1: the adaptor trains.

  llasm-jax convert --llm /ckpt/Qwen2.5-7B-Instruct --whisper /ckpt/whisper-large-v3 --mode encoder \
      --out /ckpt/llasm_qwen2_5_7b_fresh
  llasm-jax train --config configs/llasm_qwen2_5_7b_stage1.py --workdir gs://BUCKET/llasm_qwen2_5_7b_stage1 \
      --config.train.init_from=/ckpt/llasm_qwen2_5_7b_fresh \
      --config.data.source=tfds --config.data.dir=/data/asr
  (launch/tpu.sh run and launch/gpu_slurm.sh run it on every host.) Plan it first on any host:
  llasm-jax train --config configs/llasm_qwen2_5_7b_stage1.py --compile-only --topology v5p:2x2x4
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.train.sections import training_sections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      "preset": "llasm_qwen2_5_7b_encoder",
      # vocab_multiple: 152064 is already a multiple of 128 (the audio tokens fit inside it): no padding
      "llm": {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "dots_no_batch", "vocab_multiple": 128},
      "audio": {"dtype": "bfloat16", "param_dtype": "float32"},
  })
  # FSDP over every device: 7.6B float32 master weights plus Adam moments need sharding.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(1))
  config.train.steps = 20000
  config.train.batch_size = 256
  # The model's own chat template (an Instruct tokenizer has one): ChatML, <|im_start|> ... <|im_end|>
  config.data.template = "chat-template"
  config.data.seq_len = 512  # an audio of 30 s is 188 audio tokens (1500 frames / 8), plus the prompt and transcript
  return config
