r"""LLaSM on Qwen2.5-7B with the Whisper large-v3 encoder ("encoder" mode), on a TPU pod or GPU cluster.

  llasm-jax convert --llm /ckpt/Qwen2.5-7B-Instruct --whisper /ckpt/whisper-large-v3 --mode encoder \
      --out /ckpt/llasm_qwen2_5_7b_fresh
  llasm-jax train --config configs/llasm_qwen2_5_7b.py:stage1 --workdir gs://BUCKET/llasm_qwen2_5_7b_stage1 \
      --config.train.init_from=/ckpt/llasm_qwen2_5_7b_fresh \
      --config.data.source=tfds --config.data.dir=/data/asr
  llasm-jax train --config configs/llasm_qwen2_5_7b.py:stage2 --workdir gs://BUCKET/llasm_qwen2_5_7b_stage2 \
      --config.train.init_from=gs://BUCKET/llasm_qwen2_5_7b_stage1/model \
      --config.data.source=tfds --config.data.dir=/data/instructions
  (launch/tpu.sh run and launch/gpu_slurm.sh run it on every host.) Plan it first on any host:
  llasm-jax train --config configs/llasm_qwen2_5_7b.py:stage2 --compile-only --topology v5p:2x2x4

arg: "stage1" (the default: the adaptor trains) or "stage2" (the adaptor and the LLM train).
"""

from llasm_jax.train.sections import pod_encoder_config


def get_config(arg: str = "stage1"):
  # The vocab: 152064 is already a multiple of 128 (the audio tokens fit inside it): no padding.
  return pod_encoder_config("llasm_qwen2_5_7b_encoder", arg)
