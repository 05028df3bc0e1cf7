r"""LLaSM on Llama-3.1-8B with the Whisper large-v3 encoder ("encoder" mode), on a TPU pod or GPU cluster.

  llasm-jax convert --llm /ckpt/Llama-3.1-8B-Instruct --whisper /ckpt/whisper-large-v3 --mode encoder \
      --out /ckpt/llasm_llama3_1_8b_fresh
  llasm-jax train --config configs/llasm_llama3_1_8b.py:stage1 --workdir gs://BUCKET/llasm_llama3_1_8b_stage1 \
      --config.train.init_from=/ckpt/llasm_llama3_1_8b_fresh \
      --config.data.source=tfds --config.data.dir=/data/asr
  llasm-jax train --config configs/llasm_llama3_1_8b.py:stage2 --workdir gs://BUCKET/llasm_llama3_1_8b_stage2 \
      --config.train.init_from=gs://BUCKET/llasm_llama3_1_8b_stage1/model \
      --config.data.source=tfds --config.data.dir=/data/instructions
  (launch/tpu.sh run and launch/gpu_slurm.sh run it on every host.) Plan it first on any host:
  llasm-jax train --config configs/llasm_llama3_1_8b.py:stage2 --compile-only --topology v5p:2x2x4

arg: "stage1" (the default: the adaptor trains) or "stage2" (the adaptor and the LLM train).
"""

import ml_collections

from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.train.sections import stage_of, training_sections


def get_config(arg: str = "stage1"):
  stage = stage_of(arg)
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({
      "preset": "llasm_llama3_1_8b_encoder",
      # vocab_multiple: 128259 (128256 + 3 audio tokens) pads to 128384, so a tensor axis can split it
      "llm": {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "dots_no_batch" if stage == 1 else "full",
              "vocab_multiple": 128},
      "audio": {"dtype": "bfloat16", "param_dtype": "float32"},
  })
  # FSDP over every device: 8B float32 master weights plus Adam moments need sharding.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(stage))
  config.train.steps = 20000 if stage == 1 else 30000
  config.train.batch_size = 256 if stage == 1 else 128
  if stage == 2:
    # The LM head and cross-entropy 256 positions at a time: float32[B, T, V] logits are never whole.
    config.train.loss_chunk = 256
  # The model's own chat template (an Instruct tokenizer has one): Llama 3's header and <|eot_id|> tokens
  config.data.template = "chat-template"
  # Stage 1: an audio of 30 s is 188 audio tokens (1500 frames / 8), plus the prompt and transcript;
  # stage 2: multi-turn instructions.
  config.data.seq_len = 512 if stage == 1 else 2048
  return config
