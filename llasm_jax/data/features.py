"""Whisper log-mel features in numpy, equal to `transformers.WhisperFeatureExtractor` (<= 1e-4 abs).

Legend: N samples at 16 kHz, M mel bins (80 or 128), F mel frames (100 per second, <= 3000).

The recipe, as Whisper defines it: reflect-pad 200 samples on each side, Hann window (periodic)
of 400, hop 160, |rfft|^2, drop the last frame (so F = N // 160), Slaney-normalised mel
filters on the Slaney mel scale from 0 to 8 kHz, log10 with a 1e-10 floor, clamp at max - 8,
then (x + 4) / 4.

Modes:
- "llasm": the audio is zero-padded or trimmed to 30 s (480000 samples) first, F = 3000,
  exactly `WhisperFeatureExtractor()(audio)` (its default `padding="max_length"`).
- "encoder": no padding; F = N // 160 for N <= 480000 (longer audio: split it into windows
  with `audio.split_windows` first). The max - 8 clamp is taken over this clip only, which
  equals `WhisperFeatureExtractor()(audio, padding="longest")` on the clip alone. We do not
  follow HF's batched `padding="longest"`, whose features of a clip depend on the longest
  clip next to it in the batch (zero padding enters the last frames and the max); per-clip
  features are deterministic, batch-independent and what inference computes for one clip.
"""

from __future__ import annotations

import functools

import numpy as np

from llasm_jax.data.audio import SAMPLE_RATE, WINDOW_SAMPLES
from llasm_jax.errors import UserError

N_FFT = 400
HOP = 160
MAX_FRAMES = WINDOW_SAMPLES // HOP  # 3000
MODES = ("llasm", "encoder", "decoder")
# "decoder" mode: silence after the audio, at least DECODER_TAIL_SAMPLES and up to DECODER_MIN_SAMPLES
# in all. Whisper's decoder, trained on 30 s windows, loops or stops short on the encoder frames of
# speech alone. Whisper tiny.en, measured: the 30 everyday sentences (synthetic, 2-4 s) 44% WER with no
# tail, 14% with 1 s, 8.4% with 3 s (as on 30 s windows); the 12 recorded clips (1-3 s of people) still
# 204% with 3 s (it loops: "of clubs of clubs ..."), 69% padded to 8 s, 9.8% padded to 15 s (6.9% on
# 30 s windows), where the everyday sentences give 9.8%. Half a window costs half of Whisper's encoder.
DECODER_TAIL_SAMPLES = 3 * SAMPLE_RATE
DECODER_MIN_SAMPLES = 15 * SAMPLE_RATE


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
  # Slaney scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above.
  f = np.asarray(f, np.float64)
  lin = 3.0 * f / 200.0
  log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
  return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  lin = 200.0 * m / 3.0
  log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
  return np.where(m >= 15.0, log, lin)


@functools.lru_cache(maxsize=None)
def mel_filters(num_mel_bins: int) -> np.ndarray:
  """float64[N_FFT // 2 + 1, M]: triangular filters between mel-spaced edges, each scaled to
  2 / (its width in Hz) ("slaney" area normalisation)."""
  edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), num_mel_bins + 2))
  fft_freqs = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
  slopes = edges[None, :] - fft_freqs[:, None]  # [bins, M + 2]
  rising = -slopes[:, :-2] / np.diff(edges)[:-1]
  falling = slopes[:, 2:] / np.diff(edges)[1:]
  filters = np.maximum(0.0, np.minimum(rising, falling))
  filters *= 2.0 / (edges[2:] - edges[:-2])
  filters.setflags(write=False)
  return filters


@functools.lru_cache(maxsize=None)
def _window() -> np.ndarray:
  w = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as torch.hann_window
  w.setflags(write=False)
  return w


def num_frames(num_samples: int, mode: str) -> int:
  """Mel frames F that `num_samples` samples give in `mode`."""
  if mode == "decoder":
    return min(max(num_samples + DECODER_TAIL_SAMPLES, DECODER_MIN_SAMPLES), WINDOW_SAMPLES) // HOP
  return MAX_FRAMES if mode == "llasm" else num_samples // HOP


def window_samples(mode: str, mel_frames: int) -> int:
  """Samples of audio in one window (audio slot) of `mel_frames` mel frames, in the unpadded modes:
  "decoder" mode keeps room for the silent tail."""
  window = mel_frames * HOP
  return max(HOP, window - DECODER_TAIL_SAMPLES) if mode == "decoder" else window


@functools.lru_cache(maxsize=None)
def _sparse_filters(num_mel_bins: int):
  """The filters as a CSR matrix [M, bins]: each triangle covers a few FFT bins, so the product
  does ~40x fewer operations than the dense [bins, M] matmul."""
  import scipy.sparse  # a dependency of librosa

  return scipy.sparse.csr_matrix(mel_filters(num_mel_bins).T)


CHUNK = 512  # frames per FFT block: keeps the temporaries in cache instead of fresh pages


def log_mel(audio: np.ndarray, num_mel_bins: int = 80, mode: str = "llasm") -> np.ndarray:
  """float32[N] at 16 kHz -> Whisper log-mel float32[M, F] (F = 3000 in "llasm" mode, N // 160 in
  "encoder" mode, that of the audio and its silent tail in "decoder" mode: `num_frames`)."""
  if mode not in MODES:
    raise UserError(f"mode {mode!r}: expected one of {MODES}")
  audio = np.asarray(audio, np.float32).reshape(-1)
  n = len(audio)
  if mode == "llasm":
    n = min(n, WINDOW_SAMPLES)
    signal_len = WINDOW_SAMPLES
  elif n > WINDOW_SAMPLES:
    raise UserError(f"{n} samples ({n / SAMPLE_RATE:.1f} s) is more than one 30 s window; "
                     "split the audio with llasm_jax.data.audio.split_windows first")
  elif n < N_FFT:
    raise UserError(f"{n} samples is shorter than one {N_FFT}-sample frame; pad it to at least "
                     f"{N_FFT} samples (split_windows pads short tails)")
  else:
    signal_len = num_frames(n, mode) * HOP if mode == "decoder" else n  # "decoder": zeros after the audio
  frames_total = signal_len // HOP
  # Frame i reads samples [160 i - 200, 160 i + 200). Past the audio, the 30 s zero padding of
  # "llasm" mode gives all-zero frames whose power is exactly 0, i.e. log10(1e-10) = -10: only
  # the frames that touch audio go through the FFT (a 5 s clip: 1/6 of the work).
  live = min(frames_total, -(-(n + N_FFT // 2) // HOP))
  need = HOP * (live - 1) + N_FFT  # samples of the reflect-padded signal those frames read
  head = min(signal_len, need - N_FFT // 2)
  signal = np.zeros(head, np.float64)
  signal[:min(n, head)] = audio[:head]
  x = np.pad(signal, (N_FFT // 2, max(0, need - N_FFT // 2 - signal_len)), mode="reflect")
  frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:live]  # [live, N_FFT]

  filters = _sparse_filters(num_mel_bins)
  # float64 through the FFT keeps us far inside 1e-4 of HF's float32 torch result.
  mel = np.empty((num_mel_bins, live), np.float64)
  window = _window()
  for s in range(0, live, CHUNK):
    spec = np.fft.rfft(frames[s:s + CHUNK] * window, axis=-1)
    power = np.square(spec.real)
    power += np.square(spec.imag)  # [chunk, bins]
    mel[:, s:s + len(power)] = filters @ power.T
  # float32 log10 is ~3x faster and off by < 1e-6 here.
  logs = np.log10(np.maximum(mel, 1e-10).astype(np.float32))
  peak = float(logs.max())
  if live < frames_total:
    peak = max(peak, -10.0)  # the silent frames' log10(1e-10)
  floor = np.float32(peak - 8.0)
  out = np.empty((num_mel_bins, frames_total), np.float32)
  np.maximum(logs, floor, out=out[:, :live])
  out[:, live:] = max(np.float32(-10.0), floor)
  out += np.float32(4.0)
  out /= np.float32(4.0)
  return out
