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

from llasm_jax.train.sections import pod_config, stage_of


def get_config(arg: str = "stage1"):
  # tensor stays 1 because the vocab (32003) does not divide by a larger tensor axis.
  return pod_config("llasm_cllama2", stage_of(arg))
