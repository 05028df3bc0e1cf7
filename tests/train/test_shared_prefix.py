"""config.data.shared_prefix: the template's fixed opening runs once per batch and every row attends
to its keys and values; the same batches, losses and updates as the plain rows, in stage 1 and 2."""

import os

import numpy as np
import pytest

from llasm_jax import checkpoint
from llasm_jax.data import builders, pipeline
from tests.conftest import assert_close
from tests.train.test_cached import llasm_folders, stage1


@pytest.fixture(scope="module")
def setup(tmp_path_factory, assets):
  root = tmp_path_factory.mktemp("prefix")
  raw = builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")), str(root / "asr"),
                       quiet=True).path
  return dict(root=root, raw=raw, ckpt=llasm_folders(root)["encoder"])


def batches(setup, shared: bool, n=3):
  cfg = checkpoint.config_from_dict("llasm", checkpoint.read_meta(setup["ckpt"])["config"])
  pcfg = pipeline.PipelineConfig.from_model(cfg, seq_len=448, max_audios=2, mel_frames=300, shared_prefix=shared,
                                            buckets=(320, 384, 448))
  with pipeline.make_iterator(pipeline.Source(setup["raw"]), pcfg, setup["ckpt"], batch_size=2, shard_index=0,
                              shard_count=1) as it:
    return [next(it) for _ in range(n)]


def test_rows_continue_after_the_prefix(setup):
  for plain, shared in zip(batches(setup, False), batches(setup, True)):
    p = len(shared["prefix_ids"])
    assert p > 50  # the llasm-cllama2 system block, twice, in this tokenizer
    for row in range(2):
      n = int(shared["attention_mask"][row].sum())
      assert plain["attention_mask"][row].sum() == n + p
      np.testing.assert_array_equal(np.concatenate([shared["prefix_ids"], shared["input_ids"][row, :n]]),
                                    plain["input_ids"][row, :n + p])
      np.testing.assert_array_equal(shared["labels"][row, :n], plain["labels"][row, p:n + p])
      np.testing.assert_array_equal(shared["positions"][row, :n], plain["positions"][row, p:n + p])
      slots = shared["target_positions"][row]
      np.testing.assert_array_equal(slots[slots >= 0] + p, plain["target_positions"][row][plain["target_positions"][row] >= 0])
    np.testing.assert_array_equal(shared["mel"], plain["mel"])


@pytest.mark.parametrize("stage", [1, 2])
def test_same_losses_and_updates(setup, stage):
  from llasm_jax.train.trainer import train

  runs = {}
  for shared in (False, True):
    config = stage1(setup["ckpt"], setup["raw"], shared_prefix=shared)
    if stage == 2:
      config.train.trainable = ("adaptor/.*", "llm/.*")
      config.optim.lr = 1e-3
    config.train.grad_accum = 2  # the prefix is shared by the microbatches too
    workdir = str(setup["root"] / f"stage{stage}_{shared}")
    summary = train(config, workdir)
    runs[shared] = ([h["loss"] for h in summary["history"]],
                    checkpoint.load_params_numpy(os.path.join(workdir, "model")))
  (losses, params), (shared_losses, shared_params) = runs[False], runs[True]
  assert all(np.isfinite(losses)) and len(set(losses)) == 3
  assert_close(shared_losses, losses, atol=1e-5)
  start = checkpoint.load_params_numpy(setup["ckpt"])
  moved = [p for p in params if np.abs(params[p] - start[p]).max() > 1e-6]
  assert any(p.startswith("adaptor/") for p in moved)
  assert any(p.startswith("llm/") for p in moved) == (stage == 2)
  for path in params:
    assert_close(shared_params[path], params[path], atol=2e-6)
