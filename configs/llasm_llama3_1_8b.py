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

from llasm_jax.train.sections import pod_encoder_config


def get_config(arg: str = "stage1"):
  # The vocab: 128259 (128256 + 3 audio tokens) pads to 128384, so a tensor axis can split it.
  return pod_encoder_config("llasm_llama3_1_8b_encoder", arg)
