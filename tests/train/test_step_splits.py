"""The train step's split of the batch into microbatches, and which rows of the embeddings move."""

import os
import subprocess
import sys
import textwrap

import numpy as np

from llasm_jax import checkpoint
from llasm_jax.train.step import microbatches
from tests.train.test_train import ROOT, tiny_config


def test_microbatches_are_strided():
  rows = np.arange(8)[:, None] * np.ones((1, 3), np.int32)
  micro = microbatches({"input_ids": rows}, 2)["input_ids"]
  assert micro.shape == (2, 4, 3)
  np.testing.assert_array_equal(micro[0, :, 0], [0, 2, 4, 6])
  np.testing.assert_array_equal(micro[1, :, 0], [1, 3, 5, 7])


SPLIT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from llasm_jax.train.step import microbatches
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.device_put(np.arange(16 * 8, dtype=np.int32).reshape(16, 8), NamedSharding(mesh, P("data")))
    # What the accumulation loop wants: every microbatch split over all data shards.
    split = jax.jit(lambda x: microbatches({"x": x}, 2)["x"], out_shardings=NamedSharding(mesh, P(None, "data")))
    text = split.lower(rows).compile().as_text()
    print("COLLECTIVES", sum(text.count(op) for op in ("all-to-all", "collective-permute", "all-gather")))
""")


def test_microbatch_split_moves_no_data_between_devices():
  """Rows are sharded in contiguous blocks; a contiguous split would put each microbatch on half
  the devices and XLA would move rows inside the accumulation loop."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", SPLIT], env=env, capture_output=True, text=True, check=True).stdout
  assert "COLLECTIVES 0" in out, out


def test_new_token_rows_only_keeps_the_old_rows_under_weight_decay(tmp_path):
  """AdamW's decay moves a weight whose gradient is zero: the update is masked too, not only the gradient."""
  from llasm_jax.train.trainer import train

  config = tiny_config(stage=2, steps=2)
  config.train.trainable = ("adaptor/.*", "llm/.*embed_tokens.*", "llm/.*lm_head.*")
  config.train.new_token_rows_only = True
  config.optim.weight_decay = 0.1
  config.optim.lr = 1e-2
  train(config, str(tmp_path / "run"))
  config.train.steps = 0
  config.optim.lr = 0.0
  train(config, str(tmp_path / "init"))  # the same initial parameters, no step
  after, before = (checkpoint.load_params_numpy(str(tmp_path / name / "model")) for name in ("run", "init"))
  cfg = checkpoint.config_from_dict("llasm", checkpoint.read_meta(str(tmp_path / "run" / "model"))["config"])
  first = min(cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id)
  embed = next(k for k in after if k.endswith("embed_tokens/embedding"))
  np.testing.assert_array_equal(after[embed][:first], before[embed][:first])
  assert not np.array_equal(after[embed][first:], before[embed][first:])  # the audio-token rows train
  head = [k for k in after if k.endswith("lm_head/kernel")]
  for k in head:
    np.testing.assert_array_equal(after[k][:, :first], before[k][:, :first])
