"""Reverb and noise augmentation: the SNR measured on the output, the reverb's length and level, seeds."""

import numpy as np
import pytest
import soundfile as sf

from llasm_jax.data import augment, synth
from llasm_jax.errors import UserError

SR = augment.SAMPLE_RATE


def speech_like(seconds=1.5, peak=0.5, seed=0):
  """float32[N]: a voiced-like signal (harmonics of 120 Hz under a syllable envelope), silent lead and tail."""
  t = np.arange(int(seconds * SR)) / SR
  rng = np.random.default_rng(seed)
  x = sum(np.sin(2 * np.pi * 120 * k * t + rng.uniform(0, 6.28)) / k for k in range(1, 12))
  x *= np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
  x[: SR // 5] = 0
  x[-SR // 5:] = 0
  return (x * peak / np.max(np.abs(x))).astype(np.float32)


def measured_snr(speech, out):
  """SNR of `out` against the speech it holds: the speech's gain in `out` is found by projection."""
  s, o = speech.astype(np.float64), out.astype(np.float64)
  gain = np.dot(o, s) / np.dot(s, s)
  return 10 * np.log10(np.sum((gain * s) ** 2) / np.sum((o - gain * s) ** 2)), gain


@pytest.mark.parametrize("color", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_mix_at_snr(snr, color):
  s = speech_like()
  noise = augment.colored_noise(np.random.default_rng(1), len(s), color)
  out = augment.mix_at_snr(s, noise, snr)
  got, gain = measured_snr(s, out)
  assert abs(got - snr) < 0.5, (got, snr)
  assert out.dtype == np.float32 and np.max(np.abs(out)) <= augment.PEAK + 1e-6
  # Loud speech with strong noise would clip: both are scaled down together, the SNR stays.
  loud = augment.mix_at_snr(speech_like(peak=0.98), noise, snr)
  assert np.max(np.abs(loud)) <= augment.PEAK + 1e-6
  assert abs(measured_snr(speech_like(peak=0.98), loud)[0] - snr) < 0.5


def test_colored_noise_spectrum():
  # Power per octave: flat white noise doubles it each octave up (+3 dB), pink keeps it, brown halves it.
  rng = np.random.default_rng(0)
  for exponent, slope_db in ((0.0, 3.0), (1.0, 0.0), (2.0, -3.0)):
    n = augment.colored_noise(rng, 8 * SR, exponent)
    power = np.abs(np.fft.rfft(n)) ** 2
    f = np.fft.rfftfreq(len(n), 1 / SR)
    band = lambda lo: power[(f >= lo) & (f < 2 * lo)].sum()
    octave_db = 10 * np.log10(band(1000) / band(500))
    assert abs(octave_db - slope_db) < 0.5, (exponent, octave_db)
    assert abs(np.sqrt(np.mean(n.astype(np.float64) ** 2)) - 1) < 1e-3


def test_augment_draws_snr_and_repeats():
  cfg = augment.Augment(snr_db=(5.0, 20.0), noise_p=1.0)
  s = speech_like()
  out, drawn = augment.augment(s, np.random.default_rng(7), cfg)
  assert 5.0 <= drawn["snr_db"] <= 20.0
  assert abs(measured_snr(s, out)[0] - drawn["snr_db"]) < 0.5
  again, _ = augment.augment(s, np.random.default_rng(7), cfg)
  np.testing.assert_array_equal(out, again)
  other, _ = augment.augment(s, np.random.default_rng(8), cfg)
  assert not np.array_equal(out, other)
  # p = 0: untouched; nothing configured: inactive.
  same, drawn = augment.augment(s, np.random.default_rng(7), augment.Augment(snr_db=(5, 20), noise_p=0.0))
  assert same is s and drawn == {}
  assert not augment.Augment().active


def test_synthetic_impulse_decays_at_rt60():
  rt60 = 0.5
  ir = augment.synthetic_impulse(np.random.default_rng(0), rt60)
  assert len(ir) == int(rt60 * SR) and ir[0] == 1.0
  # Schroeder backward integration: the energy decay curve falls ~60 dB/rt60 (fit from -5 to -25 dB).
  edc = np.cumsum((ir[1:].astype(np.float64) ** 2)[::-1])[::-1]
  edc_db = 10 * np.log10(edc / edc[0])
  i5, i25 = np.argmax(edc_db < -5), np.argmax(edc_db < -25)
  rt_est = (i25 - i5) / SR * 3
  assert abs(rt_est - rt60) < 0.1 * rt60, rt_est


def test_reverb_builtin_longer_by_the_tail_and_level_kept():
  s = speech_like(peak=0.6)
  cfg = augment.Augment(reverb=augment.BUILTIN, reverb_p=1.0)
  out, drawn = augment.augment(s, np.random.default_rng(3), cfg)
  ir = augment.synthetic_impulse(np.random.default_rng(0), drawn["rt60"])
  assert len(out) == len(s) + len(ir) - 1
  assert abs(np.max(np.abs(out)) - 0.6) < 1e-5
  # The room rings on after the speech ends: energy in the (silent) tail of the input.
  assert np.sqrt(np.mean(out[len(s) - SR // 10:len(s)] ** 2)) > 1e-3
  # Against scipy's direct convolution of the same impulse.
  from scipy.signal import convolve

  ref = convolve(s.astype(np.float64), ir.astype(np.float64), method="direct")
  wet = augment.reverberate(s, ir)
  np.testing.assert_allclose(wet, ref * 0.6 / np.max(np.abs(ref)), atol=1e-5)
  np.testing.assert_array_equal(out, augment.augment(s, np.random.default_rng(3), cfg)[0])


def test_reverb_from_a_folder(tmp_path):
  rng = np.random.default_rng(0)
  # A stereo 44.1 kHz impulse with a silent end (cut at -60 dB) and a 16 kHz mono one.
  ir = np.zeros((4410, 2), np.float32)
  ir[0] = 1.0
  ir[1:2205] = rng.standard_normal((2204, 2)) * 0.05 * np.exp(-np.arange(2204) / 300)[:, None]
  sf.write(tmp_path / "a_room.wav", ir, 44100, subtype="FLOAT")
  sf.write(tmp_path / "b_hall.flac", (np.r_[1.0, np.zeros(799)] * 0.5).astype(np.float32), SR)
  (tmp_path / "notes.txt").write_text("not an impulse")
  irs = augment.load_impulses(str(tmp_path))
  assert len(irs) == 2 and len(irs[1]) == 1  # the pure impulse: one sample above -60 dB
  assert all(abs(np.sum(x.astype(np.float64) ** 2) - 1) < 1e-5 for x in irs)
  assert len(irs[0]) < 2205 * SR / 44100 + 10
  s = speech_like()
  cfg = augment.Augment(reverb=str(tmp_path), reverb_p=1.0)
  out, drawn = augment.augment(s, np.random.default_rng(0), cfg)
  assert len(out) == len(s) + len(irs[drawn["reverb"]]) - 1
  with pytest.raises(UserError, match="no .wav or .flac"):
    augment.load_impulses(str(tmp_path / "missing"))


def _write_text(tmp_path, lines):
  (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
  return str(tmp_path / "s.txt")


def test_synth_options_augment_and_keep_the_voice(tmp_path):
  """Through the synth: the augmented speech holds the clean voice of the same seed (its own rng)."""
  pytest.importorskip("espeakng_loader")
  text = _write_text(tmp_path, ["The weather is nice today."])
  clean = synth.synthesize(synth.plan_text(text, "wav"), str(tmp_path / "clean"), quiet=True)
  opts = synth.Options(snr_db=(15.0, 15.0), noise_p=1.0)
  noisy = synth.synthesize(synth.plan_text(text, "wav"), str(tmp_path / "noisy"), options=opts, quiet=True)
  assert clean.report["made"] == noisy.report["made"] == 1
  path = synth.plan_text(text, "wav").utterances[0].audio
  a, _ = sf.read(tmp_path / "clean" / path, dtype="float32")
  b, _ = sf.read(tmp_path / "noisy" / path, dtype="float32")
  assert len(a) == len(b)
  assert abs(measured_snr(a, b)[0] - 15.0) < 0.5
  with pytest.raises(UserError, match="--reverb"):
    synth.synthesize(synth.plan_text(text, "wav"), str(tmp_path / "bad"), quiet=True,
                     options=synth.Options(reverb=str(tmp_path / "nowhere")))
