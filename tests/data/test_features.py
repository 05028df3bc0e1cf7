"""Audio decoding and Whisper log-mel features against transformers.WhisperFeatureExtractor (<= 1e-4 abs)."""

import glob
import os

import numpy as np
import pytest
import soundfile as sf
from transformers import WhisperFeatureExtractor

from llasm_jax.data.audio import AudioError, check_audio, from_int16, load_audio, split_windows, to_int16
from llasm_jax.data.features import log_mel
from llasm_jax.errors import UserError
from tests.conftest import ASSETS, assert_close

TOL = 1e-4
SR = 16000


@pytest.fixture(scope="module", params=[80, 128], ids=["80mel", "128mel"])
def extractor(request):
  return WhisperFeatureExtractor(feature_size=request.param)


def hf(fe, audio, padding="max_length"):
  return fe(audio, sampling_rate=SR, padding=padding, return_tensors="np").input_features[0]


def real_clips():
  # A parametrize list, made before fixtures exist: the `assets` fixture's folder as a constant.
  return sorted(glob.glob(os.path.join(ASSETS, "speech_*", "*")))


def synthetic_clips():
  rng = np.random.default_rng(0)
  t = np.arange(SR * 35) / SR
  chirp = 0.5 * np.sin(2 * np.pi * (100 + 1500 * t / 35) * t)
  return {
      "sine_2s": (0.3 * np.sin(2 * np.pi * 440 * t[:2 * SR])).astype(np.float32),
      "noise_30s": (0.1 * rng.standard_normal(30 * SR)).astype(np.float32),
      "chirp_35s": chirp.astype(np.float32),  # longer than 30 s: llasm mode trims
      "quiet_noise_7s": (1e-3 * rng.standard_normal(7 * SR)).astype(np.float32),
      "odd_length": (0.2 * rng.standard_normal(12345)).astype(np.float32),
      "tiny_300": (0.2 * rng.standard_normal(300)).astype(np.float32),  # shorter than one FFT frame
  }


@pytest.mark.parametrize("path", real_clips(), ids=os.path.basename)
def test_real_audio_matches_hf(extractor, path):
  audio = load_audio(path)
  mel = log_mel(audio, extractor.feature_size, "llasm")
  assert mel.shape == (extractor.feature_size, 3000) and mel.dtype == np.float32
  assert_close(mel, hf(extractor, audio), TOL)
  enc = log_mel(audio, extractor.feature_size, "encoder")
  assert enc.shape == (extractor.feature_size, len(audio) // 160)
  assert_close(enc, hf(extractor, audio, "longest"), TOL)


@pytest.mark.parametrize("name", list(synthetic_clips()))
def test_synthetic_audio_matches_hf(extractor, name):
  audio = synthetic_clips()[name]
  assert_close(log_mel(audio, extractor.feature_size, "llasm"), hf(extractor, audio), TOL)
  if 400 <= len(audio) <= 30 * SR:
    assert_close(log_mel(audio, extractor.feature_size, "encoder"), hf(extractor, audio, "longest"), TOL)


def test_stored_int16_audio_matches_hf_on_the_same_samples(extractor, assets):
  audio = from_int16(to_int16(load_audio(os.path.join(assets, "speech_zh", "llasm_example_1.mp3"))))
  assert_close(log_mel(audio, extractor.feature_size), hf(extractor, audio), TOL)


def test_encoder_mode_rejects_more_than_one_window():
  with pytest.raises(UserError, match="split_windows"):
    log_mel(np.zeros(30 * SR + 1, np.float32), 80, "encoder")


def test_decoding_mono_16k_for_every_container(assets):
  rates = {}
  for path in real_clips():
    audio = load_audio(path)
    info = sf.info(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    # soxr keeps the duration: N_out = ceil(N_in * 16000 / rate).
    assert abs(len(audio) - info.frames * SR / info.samplerate) <= 1, path
    rates[os.path.splitext(path)[1]] = info.samplerate
  assert set(rates) == {".wav", ".flac", ".ogg", ".mp3"}
  # The wav and the flac of the same utterance decode to the same samples.
  wav, flac = (load_audio(os.path.join(assets, "speech_en", f"weather.{e}")) for e in ("wav", "flac"))
  np.testing.assert_array_equal(wav, flac)


def test_stereo_is_averaged_and_resampled(tmp_path):
  t = np.arange(44100) / 44100
  left, right = np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 300 * t)
  sf.write(tmp_path / "st.wav", np.stack([left, right], 1).astype(np.float32), 44100, subtype="FLOAT")
  audio = load_audio(tmp_path / "st.wav")
  assert len(audio) == SR
  mid = audio[1000:-1000]
  ref = 0.75 * np.sin(2 * np.pi * 300 * np.arange(SR) / SR)[1000:-1000]
  np.testing.assert_allclose(mid, ref, atol=2e-3)


def test_16k_int16_round_trips_exactly(tmp_path):
  pcm = (np.random.default_rng(1).standard_normal(SR) * 3000).astype(np.int16)
  sf.write(tmp_path / "x.flac", pcm, SR)
  np.testing.assert_array_equal(to_int16(load_audio(tmp_path / "x.flac")), pcm)


def test_audio_errors_name_the_file_and_reason(tmp_path):
  (tmp_path / "empty.wav").write_bytes(b"")
  (tmp_path / "junk.mp3").write_bytes(os.urandom(3000))
  sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), SR)
  cases = {"missing.wav": "missing", "empty.wav": "empty", "junk.mp3": "unreadable", "zero.wav": "empty"}
  for name, reason in cases.items():
    with pytest.raises(AudioError) as e:
      load_audio(tmp_path / name)
    assert e.value.reason == reason and name in str(e.value)
  for audio, reason in [(np.zeros(SR, np.float32), "silent"), (np.full(100, 0.1, np.float32), "too_short"),
                        (np.full(31 * SR, 0.1, np.float32), "too_long")]:
    with pytest.raises(AudioError) as e:
      check_audio(audio, "clip.wav")
    assert e.value.reason == reason and "clip.wav" in str(e.value)


def test_split_windows():
  audio = np.arange(30 * SR * 2 + 100, dtype=np.float32)
  windows = split_windows(audio)
  assert [len(w) for w in windows] == [30 * SR, 30 * SR, 1600]  # a 100-sample tail padded to 0.1 s
  np.testing.assert_array_equal(np.concatenate(windows)[:len(audio)], audio)
  assert [len(w) for w in split_windows(audio[:45 * SR], 15 * SR)] == [15 * SR] * 3
