"""The batch contract's one spec (`batch_spec`) against the batches the pipeline makes, and the audio geometry's one owner."""

import dataclasses

import numpy as np
import pytest

from llasm_jax.data import contract, pipeline
from llasm_jax.data.prompts import AudioPrompts
from llasm_jax.errors import UserError
from llasm_jax.models.geometry import WINDOW_FRAMES, AudioGeometry
from llasm_jax.models.whisper import encoder_frames
from llasm_jax.tokens import IGNORE
from llasm_jax.train.sections import training_sections
from llasm_jax.train.synthetic import example_spec, make_example
from tests.data.conftest import tiny_model


def first_batch(source, cfg, tokenizer_dir, b):
  with pipeline.make_iterator(source, cfg, tokenizer_dir, batch_size=b, shard_index=0, shard_count=1) as it:
    return next(it)


@pytest.mark.parametrize("mode, kind, kw", [
    ("llasm", "asr", dict(seq_len=128, teacher=True)),
    ("encoder", "instructions", dict(seq_len=256, max_audios=4, mel_frames=100, ctc=True)),
    ("encoder", "asr", dict(seq_len=448, max_audios=2, mel_frames=300, system=None, shared_prefix=True)),
], ids=["llasm_teacher", "encoder_ctc", "encoder_shared_prefix"])
def test_fixed_shape_batches_are_their_spec(tokenizer_dir, mode, kind, kw):
  model = tiny_model(mode)
  cfg = pipeline.PipelineConfig.from_model(model, **{"system": "", **kw})
  assert cfg.fixed_shapes
  source = pipeline.SyntheticSource(kind, 4, seed=5, max_turns=2, seconds=(0.5, 1.5))
  batch = first_batch(source, cfg, tokenizer_dir, 2)
  prefix = len(batch["prefix_ids"]) if cfg.shared_prefix else 0
  spec = contract.batch_spec(cfg, 2, prefix_len=prefix)
  assert list(batch) and set(batch) == set(spec)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
  contract.check_batch(batch, model)


def test_cached_spec_takes_the_cache_width_and_dtype():
  cfg = pipeline.PipelineConfig(mode="encoder", mel_frames=40, features="cached", seq_len=100, max_audios=4)
  spec = contract.batch_spec(cfg, 3, feature_dim=64, feature_dtype="bfloat16")
  assert spec["audio_features"] == ((3, 4, encoder_frames(40), 64), np.dtype("bfloat16"))
  assert "mel" not in spec and spec["audio_feature_lengths"] == ((3, 4), np.dtype(np.int32))


def test_check_batch_names_the_broken_key():
  model = tiny_model()
  cfg = pipeline.PipelineConfig.from_model(model, seq_len=16)
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in contract.batch_spec(cfg, 2).items()}
  contract.check_batch(batch, model)  # all zeros: no audio, no markers
  with pytest.raises(UserError, match=r"batch\['mel'\]: float64\[2, 1, 80, 3000\], expected float32\[2, \.\.\.\]"):
    contract.check_batch({**batch, "mel": batch["mel"].astype(np.float64)}, model)
  with pytest.raises(UserError, match=r"batch\['mel_lengths'\]: int32\[2\], expected int32"):
    contract.check_batch({**batch, "mel_lengths": batch["mel_lengths"][:, 0]}, model)


def test_teacher_slots_keep_what_both_sequences_hold():
  teacher = np.full((2, 8), IGNORE, np.int32)
  teacher[0, 3:6] = 1  # targets at 3, 4, 5: slots 2, 3, 4
  teacher[1, 6:] = 1
  student = np.int32([[4, 5, -1, -1], [2, 3, 4, 5]])
  assert contract.teacher_target_positions(teacher, student).tolist() == [[2, 3, -1, -1], [5, 6, -1, -1]]


@pytest.mark.parametrize("mode", ["llasm", "encoder"])
def test_synthetic_examples_are_rows_of_the_spec(mode):
  cfg = tiny_model(mode)
  data = training_sections(1)["data"]
  data.seq_len, data.mel_frames = 320, 300
  spec = example_spec(cfg, data, teacher=True)
  example = make_example(cfg, data, 0, 3, teacher=True)
  assert {k: (v.shape, v.dtype) for k, v in example.items()} == spec
  assert spec["mel"][0] == (1, 80, WINDOW_FRAMES if mode == "llasm" else 300)


@pytest.mark.parametrize("mode", ["llasm", "encoder"])
def test_one_geometry_for_model_pipeline_and_prompts(mode):
  model = tiny_model(mode)
  cfg = pipeline.PipelineConfig.from_model(model, mel_frames=300)
  geometry = model.geometry(300)
  assert cfg.geometry == geometry == AudioPrompts.of(cfg).geometry == AudioPrompts.of(model, 300).geometry
  assert AudioPrompts.of(cfg, 200).geometry == dataclasses.replace(geometry, mel_frames=200)
  assert cfg.frames == geometry.frames == (WINDOW_FRAMES if mode == "llasm" else 300)
  for frames in (1, 99, 100, 300, 3000):
    assert model.audio_tokens(frames) == cfg.audio_tokens(frames) == geometry.audio_tokens(frames)
    assert model.feature_frames(frames) == geometry.feature_frames(frames)
  assert cfg.feature_frames == geometry.window_features and cfg.ctc_width == geometry.window_tokens
  assert AudioGeometry("encoder", 64, 4, 300).audio_tokens(np.int32([300, 8])).tolist() == [38, 1]
  assert AudioPrompts.of(None).mode is None
