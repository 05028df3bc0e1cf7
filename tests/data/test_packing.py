"""config.data.packing: rows of whole samples within both budgets, each sample's tokens, labels,
positions and audio slots as it has them alone, and an exact resume mid-window."""

import dataclasses
import json

import numpy as np
import pytest

from llasm_jax.data import contract, packing, pipeline
from llasm_jax.errors import UserError
from llasm_jax.tokens import IGNORE
from tests.data.conftest import tiny_model

SEQ, SLOTS, WINDOW = 1024, 12, 12


def test_first_fit_decreasing_keeps_both_budgets():
  # Longest first: 8 opens row 0, 7 row 1, 5 row 2; 3 fills row 1, 2 fills row 0's tokens and
  # slots, and 1 (two slots) fits no row's slots.
  assert packing.first_fit_decreasing([5, 3, 8, 2, 7, 1], [1, 0, 1, 1, 0, 2], 10, 2) == [[2, 3], [1, 4], [0], [5]]
  rng = np.random.default_rng(0)
  lengths = np.clip(rng.lognormal(np.log(60), 0.8, 300).astype(int), 1, 256)
  slots = rng.integers(0, 3, 300)
  rows = packing.first_fit_decreasing(lengths, slots, 256, 4)
  assert sorted(i for r in rows for i in r) == list(range(300))  # every sample once
  assert all(sum(lengths[r]) <= 256 and sum(slots[r]) <= 4 and r == sorted(r) for r in rows)
  assert sum(lengths) / (256 * len(rows)) > 0.8
  with pytest.raises(UserError, match="does not fit"):
    packing.first_fit_decreasing([300], [0], 256, 4)


def configs(shared_prefix=False, **kw):
  model = tiny_model("encoder")
  # 3 s windows: clips of 1-4 s take one or two slots, conversations up to three clips.
  cfg = pipeline.PipelineConfig.from_model(model, seq_len=SEQ, max_audios=SLOTS, mel_frames=300, packing=True,
                                           pack_window=WINDOW, shared_prefix=shared_prefix, **kw)
  return model, cfg, dataclasses.replace(cfg, packing=False)


SOURCE = pipeline.SyntheticSource("instructions", 30, seed=4, seconds=(1.0, 4.0), max_turns=3)


def segments(row):
  """(start, end) of each sample of a packed row."""
  seg = row["segment_ids"]
  bounds = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0).tolist() + [len(seg)]
  return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["plain", "shared_prefix"])
def test_rows_hold_whole_samples_with_their_audio(tokenizer_dir, shared_prefix):
  model, cfg, plain_cfg = configs(shared_prefix)
  kw = dict(seed=3, shard_index=0, shard_count=1)
  window = pipeline.batched_dataset(SOURCE, cfg, tokenizer_dir, batch_size=2, **kw)[1]
  # The same samples unpacked: a batch of one window's samples is the same stretch of the stream.
  alone = pipeline.batched_dataset(SOURCE, plain_cfg, tokenizer_dir, batch_size=WINDOW, **kw)[1]
  start = len(alone["prefix_ids"]) if shared_prefix else 0
  lengths = alone["attention_mask"].sum(1)
  slots = (alone["mel_lengths"] > 0).sum(1)
  assert len(set(lengths.tolist())) > 4 and slots.max() > 1  # lengths and audio counts vary
  rows = packing.window_rows(window)
  assert [len(r["input_ids"]) for r in rows] == [sum(lengths[m]) for m in
                                                 packing.first_fit_decreasing(lengths, slots, SEQ, SLOTS)]
  assert len(rows) < WINDOW // 2  # several samples per row
  seen = []
  for row, members in zip(rows, packing.first_fit_decreasing(lengths, slots, SEQ, SLOTS)):
    assert len(row["input_ids"]) <= SEQ and len(row["mel_lengths"]) <= SLOTS
    slot = 0
    for k, ((a, z), i) in enumerate(zip(segments(row), members)):
      n, s = int(lengths[i]), int(slots[i])
      assert z - a == n and np.all(row["segment_ids"][a:z] == k + 1)
      np.testing.assert_array_equal(row["input_ids"][a:z], alone["input_ids"][i, :n])
      assert alone["labels"][i, 0] == IGNORE  # so the packed labels equal the sample's
      np.testing.assert_array_equal(row["labels"][a:z], alone["labels"][i, :n])
      np.testing.assert_array_equal(row["positions"][a:z], alone["positions"][i, :n])
      assert row["positions"][a] == start
      # Its audio: the next slots of the row, in the order of its markers.
      np.testing.assert_array_equal(row["mel_lengths"][slot:slot + s], alone["mel_lengths"][i, :s])
      np.testing.assert_array_equal(row["mel"][slot:slot + s], alone["mel"][i, :s])
      slot += s
      seen.append(i)
    assert slot == len(row["mel_lengths"])
  assert sorted(seen) == list(range(WINDOW))
  batch = pipeline.Collate(cfg, 0)(rows)
  contract.check_batch(batch, model)  # markers against slots, segments and restarting positions
  assert batch["mel"].shape[1] == SLOTS and np.all(batch["segment_ids"][batch["attention_mask"] == 0] == 0)


def test_cached_features_follow_their_samples():
  """Cached slots are unpadded frames back to back: each row gets its samples' frames, in order."""
  rng = np.random.default_rng(1)
  samples = []
  for i, (n, frames) in enumerate([(30, [5, 3]), (50, []), (20, [7]), (40, [2, 4, 6])]):
    samples.append({"input_ids": np.full(n, i, np.int32), "labels": np.full(n, IGNORE, np.int32),
                    "audio_features": rng.standard_normal((sum(frames), 4)).astype(np.float32),
                    "audio_feature_lengths": np.int32(frames)})
  rows = packing.window_rows(packing.Pack(seq_len=100, max_audios=4)(samples))
  # Longest first: 50 (no audio) and 40 (three slots) share row 0; 30 and 20 make row 1.
  assert [sorted(set(r["input_ids"].tolist())) for r in rows] == [[1, 3], [0, 2]]
  assert [r["segment_ids"].max() for r in rows] == [2, 2]
  for row in rows:
    want = np.concatenate([samples[i]["audio_features"] for i in sorted(set(row["input_ids"].tolist()))])
    np.testing.assert_array_equal(row["audio_features"], want)
  np.testing.assert_array_equal(rows[0]["audio_feature_lengths"], [2, 4, 6])
  np.testing.assert_array_equal(rows[1]["audio_feature_lengths"], [5, 3, 7])
  cfg = pipeline.PipelineConfig(seq_len=100, max_audios=4, mode="encoder", mel_frames=40, features="cached",
                                packing=True)
  batch = pipeline.Collate(cfg, 0)(rows)
  assert batch["audio_features"].shape == (2, 4, cfg.feature_bucket(7), 4)
  np.testing.assert_array_equal(batch["audio_features"][0, 2, :6], samples[3]["audio_features"][6:])
  np.testing.assert_array_equal(batch["audio_features"][1, 2, :7], samples[2]["audio_features"])
  assert not batch["audio_features"][1, 2, 7:].any() and not batch["audio_features"][1, 3].any()


def test_resume_mid_window_equals_uninterrupted_run(tokenizer_dir):
  _, cfg, _ = configs()
  cfg = dataclasses.replace(cfg, pack_window=5)  # 30 samples: six windows per epoch, rows of ~2.5 samples
  kw = dict(batch_size=3, seed=7, shard_index=0, shard_count=1)
  with pipeline.make_iterator(SOURCE, cfg, tokenizer_dir, **kw) as it:
    full = [next(it) for _ in range(7)]  # about two epochs, batches across window boundaries
  with pipeline.make_iterator(SOURCE, cfg, tokenizer_dir, **kw) as it:
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 3 and state["pack_window"] == 5 and (state["window"], state["row"]) != (3, 0)
  with pipeline.make_iterator(SOURCE, cfg, tokenizer_dir, workers=1, **kw) as it:
    it.set_state(state)
    rest = [next(it) for _ in range(4)]
  for a, b in zip(full, first + rest):
    assert set(a) == set(contract.batch_keys(packed=True))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # A packed state does not resume unpacked batches, nor the other way round.
  with pipeline.make_iterator(SOURCE, dataclasses.replace(cfg, packing=False), tokenizer_dir, **kw) as it:
    with pytest.raises(UserError, match="packing=True"):
      it.set_state(state)
    plain_state = it.get_state()
  with pipeline.make_iterator(SOURCE, cfg, tokenizer_dir, **kw) as it:
    with pytest.raises(UserError, match="packing=False"):
      it.set_state(plain_state)


def test_packing_config_errors():
  with pytest.raises(UserError, match="teacher"):
    pipeline.PipelineConfig(packing=True, teacher=True)
  with pytest.raises(UserError, match="pack_window"):
    pipeline.PipelineConfig(packing=True, pack_window=0)
