"""Audio files -> 16 kHz mono float32 samples, the checks a training clip must pass, and 30 s windows.

Legend: N samples at 16 kHz.

Decoding: soundfile (libsndfile: wav, flac, ogg/vorbis, and mp3 since libsndfile 1.1) first,
then librosa/audioread for whatever libsndfile cannot open. Channels are averaged (what
ffmpeg `-ac 1`, which Whisper uses, does) and the rate is converted with soxr (HQ).
Storage is int16 at 16 kHz: Whisper itself reads audio through ffmpeg as s16le 16 kHz, so
int16 loses nothing Whisper would have seen, and LibriSpeech/AISHELL (16-bit, 16 kHz) round-trip
exactly (`to_int16(x) / 32768 == x`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from llasm_jax.errors import UserError

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's 30 s input window
MIN_WINDOW_SAMPLES = SAMPLE_RATE // 10  # a trailing window shorter than 0.1 s is zero-padded to 0.1 s


class AudioError(UserError):
  """An audio file that cannot be used. `reason` is a short code for counting
  ("missing", "unreadable", "empty", "silent", "too_short", "too_long"); the message names the file."""

  def __init__(self, path: str, reason: str, detail: str):
    self.path, self.reason, self.detail = str(path), reason, detail
    super().__init__(f"audio {str(path)!r}: {detail}")

  def __reduce__(self):
    return AudioError, (self.path, self.reason, self.detail)


def _decode(path: str) -> tuple[np.ndarray, int]:
  """float32[N, C] (or [N]) samples and their rate, by soundfile, else librosa/audioread."""
  import soundfile as sf

  try:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return data, rate
  except Exception as sf_error:  # libsndfile raises several types; the fallback decides
    first = str(sf_error)
  try:
    import librosa

    with warnings.catch_warnings():
      # librosa warns that it fell back to audioread; the fallback is the point here.
      warnings.simplefilter("ignore")
      data, rate = librosa.load(path, sr=None, mono=False, dtype=np.float32)
  except Exception as e:
    second = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (no ffmpeg/gstreamer backend decodes it)"
    raise AudioError(path, "unreadable", f"cannot decode (libsndfile: {first}; librosa/audioread: {second}); "
                     "the file is corrupt or in an unsupported format: re-encode it as wav/flac") from None
  data = np.asarray(data, np.float32)
  return (data.T if data.ndim == 2 else data), int(rate)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """float32[N] mono samples of `path` at `sample_rate` (16 kHz). Raises AudioError."""
  import soxr

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AudioError(path, "missing", "file not found; check the path (relative paths are resolved from the current folder, or from --audio-root when building datasets)")
  if os.path.getsize(path) == 0:
    raise AudioError(path, "empty", "file is empty (0 bytes)")
  data, rate = _decode(path)
  if data.ndim == 2:
    data = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
  if data.size == 0:
    raise AudioError(path, "empty", "no samples (0 s of audio)")
  if not np.all(np.isfinite(data)):
    raise AudioError(path, "unreadable", "decoded samples contain NaN or Inf; the file is corrupt")
  if rate != sample_rate:
    data = soxr.resample(data, rate, sample_rate, quality="HQ")
  return np.ascontiguousarray(data, dtype=np.float32)


def check_audio(audio: np.ndarray, path: str, *, min_seconds: float = 0.1, max_seconds: float | None = 30.0,
                silence_peak: float = 1e-4) -> None:
  """Raises AudioError if float32[N] `audio` (16 kHz) is too short, too long, or silent.

  Silent means a peak below `silence_peak` (1e-4 = -80 dBFS, i.e. below 4 int16 steps): such a
  clip has no speech to learn from, and its log-mel is flat after Whisper's max - 8 clamp.
  """
  seconds = len(audio) / SAMPLE_RATE
  if len(audio) == 0:
    raise AudioError(path, "empty", "no samples (0 s of audio)")
  if seconds < min_seconds:
    raise AudioError(path, "too_short", f"{seconds:.3f} s is shorter than the {min_seconds:g} s minimum")
  if max_seconds is not None and seconds > max_seconds:
    raise AudioError(path, "too_long", f"{seconds:.1f} s is longer than the {max_seconds:g} s maximum "
                     "(raise --max-seconds for encoder-mode data, which splits audio into 30 s windows)")
  peak = float(np.max(np.abs(audio)))
  if peak < silence_peak:
    raise AudioError(path, "silent", f"silent (peak {peak:.2e} < {silence_peak:g})")


def to_int16(audio: np.ndarray) -> np.ndarray:
  """float32[N] in [-1, 1] -> int16[N] (x * 32768, rounded and clipped), the stored form."""
  return np.clip(np.rint(audio * 32768.0), -32768, 32767).astype(np.int16)


def from_int16(audio: np.ndarray) -> np.ndarray:
  """int16[N] -> float32[N] / 32768, what soundfile and ffmpeg give for 16-bit PCM."""
  return audio.astype(np.float32) * np.float32(1.0 / 32768.0)


def split_windows(audio: np.ndarray, window: int = WINDOW_SAMPLES, min_tail: int = MIN_WINDOW_SAMPLES) -> list[np.ndarray]:
  """float32[N] -> consecutive windows of at most `window` samples (encoder mode: one audio slot each).

  A trailing window shorter than `min_tail` is zero-padded up to it, so every window yields
  at least `min_tail // 160` mel frames and no speech is dropped.
  """
  if len(audio) == 0:
    return []
  out = [audio[i:i + window] for i in range(0, len(audio), window)]
  if len(out[-1]) < min_tail:
    out[-1] = np.pad(out[-1], (0, min_tail - len(out[-1])))
  return out


def synth_speech(seconds: float, seed: int) -> np.ndarray:
  """float32[N] speech-like audio at 16 kHz: a voiced chirp with harmonics, syllable-rate
  amplitude bursts and background noise, so the log-mel has structure in time and frequency."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  f0 = 110 + 60 * rng.random() + 40 * np.sin(2 * np.pi * 0.7 * t)  # a wandering pitch
  phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
  voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
  syllables = np.clip(np.sin(2 * np.pi * (3.5 + rng.random()) * t + rng.random() * 6), 0, None) ** 2
  noise = 0.02 * rng.standard_normal(t.shape)
  return (0.3 * voiced * syllables + noise).astype(np.float32)
