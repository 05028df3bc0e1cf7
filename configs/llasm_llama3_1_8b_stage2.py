r"""LLaSM on Llama-3.1-8B with the Whisper large-v3 encoder ("encoder" mode), stage 2: the adaptor and the LLM train.

  llasm-jax convert --llm /ckpt/Llama-3.1-8B-Instruct --whisper /ckpt/whisper-large-v3 --mode encoder \
      --out /ckpt/llasm_llama3_1_8b_fresh
  llasm-jax train --config configs/llasm_llama3_1_8b_stage2.py --workdir gs://BUCKET/llasm_llama3_1_8b_stage2 \
      --config.train.init_from=gs://BUCKET/llasm_llama3_1_8b_stage1/model \
      --config.data.source=tfds --config.data.dir=/data/instructions
  (launch/tpu.sh run and launch/gpu_slurm.sh run it on every host.) Plan it first on any host:
  llasm-jax train --config configs/llasm_llama3_1_8b_stage2.py --compile-only --topology v5p:2x2x4
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.train.sections import training_sections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      "preset": "llasm_llama3_1_8b_encoder",
      # vocab_multiple: 128259 (128256 + 3 audio tokens) pads to 128384, so a tensor axis can split it
      "llm": {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "full", "vocab_multiple": 128},
      "audio": {"dtype": "bfloat16", "param_dtype": "float32"},
  })
  # FSDP over every device: 8B float32 master weights plus Adam moments need sharding.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(2))
  config.train.steps = 30000
  config.train.batch_size = 128
  # The LM head and cross-entropy 256 positions at a time: float32[B, T, V] logits are never whole.
  config.train.loss_chunk = 256
  # The model's own chat template (an Instruct tokenizer has one): Llama 3's header and <|eot_id|> tokens
  config.data.template = "chat-template"
  config.data.seq_len = 2048  # multi-turn instructions
  return config
