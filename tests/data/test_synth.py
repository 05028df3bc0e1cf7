"""Spoken-data synthesis: espeak speech measured from the samples (level, length, pitch), determinism,
resume, failures, and the dataset builders accepting what `data synth` writes."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from llasm_jax.data import builders, synth, tts
from llasm_jax.data.audio import load_audio, to_int16
from llasm_jax.data.tts_espeak import EspeakEngine, EspeakVoice

SR = 16000
EN = ["hello", "hello world, how are you", "hello world, this is a short test of the speech pipeline on a sunny day"]
ZH = ["你好", "请介绍一下北京", "世界上人口最多的是哪个国家，请详细介绍一下"]


@pytest.fixture(scope="module")
def engine():
  return EspeakEngine()


def f0_median(audio, sr=SR):
  """Median pitch (Hz) of the voiced 40 ms frames, by autocorrelation: independent of espeak."""
  frame, lo, hi, out = 640, sr // 400, sr // 60, []
  for i in range(0, len(audio) - frame, frame // 2):
    x = audio[i:i + frame].astype(np.float64)
    if np.sqrt(np.mean(x ** 2)) < 0.03:
      continue
    x = x - x.mean()
    c = np.correlate(x, x, "full")[frame - 1:]
    k = lo + int(np.argmax(c[lo:hi]))
    if c[k] > 0.3 * c[0]:
      out.append(sr / k)
  assert len(out) >= 5, "too few voiced frames"
  return float(np.median(out))


def speech_seconds(audio, floor=0.01):
  """Seconds from the first to the last sample above `floor` (the speech without the silences)."""
  loud = np.flatnonzero(np.abs(audio) > floor)
  return (loud[-1] - loud[0]) / SR


def test_english_and_mandarin_speech(engine):
  voice = lambda name, rate: EspeakVoice(name, rate=rate, pitch=50, range=50, volume=70, lead=0.3, tail=0.3)
  for texts, name, rate in ((EN, "en-us", 160), (ZH, "cmn", 140)):
    durations = []
    for text in texts:
      audio = engine.render(text, voice(name, rate))
      assert audio.dtype == np.float32 and audio.ndim == 1
      assert 0.2 < np.max(np.abs(audio)) <= 1.0, text
      assert np.sqrt(np.mean(audio ** 2)) > 0.02, text
      assert np.all(audio[:int(0.25 * SR)] == 0) and np.all(audio[-int(0.25 * SR):] == 0)  # lead-in, tail
      durations.append(speech_seconds(audio))
    assert durations[0] < durations[1] < durations[2], (name, durations)
  # A default male voice at 16 kHz sits at a man's pitch (~100-130 Hz; a wrong sample rate would
  # move it 1.38x), speaks 2.5-5 words a second, and the rate setting scales that.
  long_en = engine.render(EN[2], voice("en-us", 160))
  assert 85 < f0_median(long_en) < 140
  assert 2.5 < len(EN[2].split()) / speech_seconds(long_en) < 5
  slow, fast = (speech_seconds(engine.render(EN[2], voice("en-us", r))) for r in (120, 180))
  assert 1.25 < slow / fast < 1.75
  # Mandarin uses the Mandarin voice: ~0.2-0.5 s per syllable, where the English voice spells the
  # characters out at more than twice the length.
  for text in ZH[1:]:
    zh = engine.synthesize(text, "zh", np.random.default_rng(0))
    en_reading = engine.render(text, voice("en-us", 140))
    assert 0.15 < speech_seconds(zh) / len(text) < 0.5
    assert speech_seconds(en_reading) > 1.5 * speech_seconds(zh)
  assert engine.pick_voice("zh", np.random.default_rng(0)).name.startswith("cmn")
  assert engine.pick_voice("en", np.random.default_rng(0)).name.startswith("en")


def test_voices_vary_across_utterances_and_repeat_exactly(engine):
  text = "please tell me a story about a brave little dog"
  rngs = lambda: [tts.utterance_rng(0, f"utt{i}") for i in range(8)]
  voices = [engine.pick_voice("en", r) for r in rngs()]
  assert len({v.name for v in voices}) >= 4 and len({v.rate for v in voices}) >= 6 and len({v.pitch for v in voices}) >= 6
  assert all(140 <= v.rate <= 175 and 35 <= v.pitch <= 65 for v in voices)
  audios = [engine.synthesize(text, "en", r) for r in rngs()]
  lengths = [speech_seconds(a) for a in audios]
  pitches = [f0_median(a) for a in audios]
  assert max(lengths) / min(lengths) > 1.15 and max(pitches) - min(pitches) > 30, (lengths, pitches)
  # The same (seed, id) repeats bit for bit, in any order: espeak's carried state is reset per utterance.
  again = [engine.synthesize(text, "en", r) for r in reversed(rngs())][::-1]
  for a, b in zip(audios, again):
    np.testing.assert_array_equal(a, b)
  other_seed = engine.synthesize(text, "en", tts.utterance_rng(1, "utt0"))
  assert len(other_seed) != len(audios[0]) or not np.array_equal(other_seed, audios[0])


PERTURBED = """
import hashlib, json, sys
from llasm_jax.data.tts_espeak import EspeakEngine, EspeakVoice
engine = EspeakEngine()
print(json.dumps([hashlib.sha1(engine.render(sys.argv[1], EspeakVoice(v, 160, 60, 60)).tobytes()).hexdigest()
                  for v in sys.argv[2:]]))
"""


def test_pool_voices_do_not_depend_on_heap_contents(engine):
  """Every pooled voice gives the same samples here and in processes whose fresh and freed heap
  memory is filled with other patterns (MALLOC_PERTURB_). espeak's "breath" variants fail this
  (their noise reads uninitialized memory; en-us+f2 changed between runs a few seconds apart), so
  no pooled variant may set breath."""
  import hashlib
  import subprocess
  import sys

  import espeakng_loader

  from llasm_jax.data.tts_espeak import EN_VOICES, ZH_VOICES

  voices = list(EN_VOICES + ZH_VOICES)
  for v in voices:
    if "+" in v:
      variant = os.path.join(espeakng_loader.get_data_path(), "voices", "!v", v.split("+")[1])
      assert not any(line.split()[:1] == ["breath"] for line in open(variant, encoding="latin-1")), v
  text = "what will the weather be like 北京"
  here = [hashlib.sha1(engine.render(text, EspeakVoice(v, 160, 60, 60)).tobytes()).hexdigest() for v in voices]
  for pattern in ("85", "170"):
    out = subprocess.run([sys.executable, "-c", PERTURBED, text, *voices], capture_output=True, text=True,
                         env={**os.environ, "MALLOC_PERTURB_": pattern}, check=True)
    assert json.loads(out.stdout) == here


def test_language_ids_and_file_names():
  assert tts.detect_language("请介绍一下北京") == "zh"
  assert tts.detect_language("我喜欢用 Python 写程序") == "zh"
  assert tts.detect_language("Tell me about 北京 please") == "en"
  assert tts.detect_language("what will the weather be like") == "en"
  assert [tts.normalize_language(c, "x") for c in ("zh-CN", "cmn", "EN_us", "fr", None)] == ["zh", "zh", "en", "fr", "en"]
  assert tts.normalize_language("auto", "你好") == "zh"
  assert synth.file_stem("utt-001_a.b") == "utt-001_a.b"
  names = {synth.file_stem(u) for u in ("a/b", "a_b", "a b", "../a_b", "你好", "你们")}
  assert len(names) == 6 and all(n and not n.startswith(".") and "/" not in n for n in names)
  assert synth.audio_path("x", "flac") == synth.audio_path("x", "flac") and synth.audio_path("x", "wav").endswith("/x.wav")


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return str(path)


def test_asr_manifest_builds_and_resumes(tmp_path):
  src = tmp_path / "sentences.txt"
  src.write_text("\n".join(EN[1:] + ["", "what will the weather be like in paris"] + ZH[1:]) + "\n", encoding="utf-8")
  plan = synth.plan_text(str(src))
  assert [u.language for u in plan.utterances] == ["en", "en", "en", "zh", "zh"]
  out = tmp_path / "out"
  first = synth.synthesize(plan, str(out), workers=0, quiet=True)
  assert (first.report["made"], first.report["kept"], first.report["failed"]) == (5, 0, 0)
  rows = [json.loads(line) for line in open(first.manifest, encoding="utf-8")]
  assert [r["text"] for r in rows] == [u.text for u in plan.utterances]
  files = [out / r["audio"] for r in rows]
  for f in files:
    info = sf.info(str(f))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 1, "PCM_16", "FLAC")
  data = {f: f.read_bytes() for f in files}

  # Resume: existing files are kept untouched, the missing one is made again, identically.
  mtimes = {f: os.stat(f).st_mtime_ns for f in files}
  files[1].unlink()
  stale = files[0].parent / f".{files[0].name}.999.tmp"
  stale.write_bytes(b"half a file")
  second = synth.synthesize(plan, str(out), workers=0, quiet=True)
  assert (second.report["made"], second.report["kept"], second.report["failed"]) == (1, 4, 0)
  assert all(os.stat(f).st_mtime_ns == mtimes[f] for f in files if f != files[1])
  assert files[1].read_bytes() == data[files[1]] and not stale.exists()

  # Seeded reruns in two worker processes (other order, other process) give the same bytes.
  third = synth.synthesize(plan, str(tmp_path / "parallel"), workers=2, quiet=True)
  assert third.report["made"] == 5
  for r, f in zip(rows, files):
    assert (tmp_path / "parallel" / r["audio"]).read_bytes() == data[f]

  # The ASR builder takes the manifest as it is: nothing skipped, the audio is the files'.
  result = builders.build("asr", builders.asr_rows(manifest=first.manifest), str(tmp_path / "ds"), quiet=True)
  assert result.report["kept"] == 5 and result.report["skipped"] == {}
  import tensorflow_datasets as tfds

  ds = tfds.builder_from_directory(result.path).as_data_source("train")
  by_text = {ds[i]["text"].decode(): ds[i] for i in range(len(ds))}
  for r, f in zip(rows, files):
    np.testing.assert_array_equal(by_text[r["text"]]["audio"], to_int16(load_audio(str(f))))
    assert by_text[r["text"]]["language"].decode() == r["language"]


def test_instructions_build(tmp_path):
  convs = [
      {"id": "c1", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                     {"from": "gpt", "value": "Paris."},
                                     {"from": "human", "value": "And of Germany?"},
                                     {"from": "gpt", "value": "Berlin."}]},
      {"id": "c2", "conversations": [{"from": "human", "value": "请介绍一下北京"}, {"from": "gpt", "value": "北京是中国的首都。"}],
       "source": "sharegpt"},
      {"id": "c3", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "?"}]},
      {"id": "c4", "conversations": [{"from": "gpt", "value": "hi"}]},
      {"id": "c5", "conversations": [{"from": "human", "value": "hi", "audio": "x.wav"}, {"from": "gpt", "value": "hi"}]},
  ]
  src = tmp_path / "convs.json"
  src.write_text(json.dumps(convs, ensure_ascii=False), encoding="utf-8")
  out = tmp_path / "out"
  res = synth.synthesize(synth.plan_instructions(str(src), fmt="wav"), str(out), quiet=True)
  r = res.report
  assert (r["made"], r["failed"], r["failed_by_reason"]) == (3, 1, {"empty_text": 1})
  assert r["conversations"] == 5 and r["rows_written"] == 2
  assert r["conversations_failed_by_reason"] == {"bad_row": 1, "has_audio": 1, "utterance_failed": 1}
  written = [json.loads(line) for line in open(res.manifest, encoding="utf-8")]
  assert [w["id"] for w in written] == ["c1", "c2"] and written[1]["source"] == "sharegpt"
  assert [w["language"] for w in written] == ["en", "zh"]
  for w, c in zip(written, convs):
    for turn, orig in zip(w["conversations"], c["conversations"]):
      assert turn["value"] == orig["value"] and ("audio" in turn) == (orig["from"] == "human")
      if "audio" in turn:
        assert turn["audio"].endswith(".wav") and (out / turn["audio"]).is_file()

  result = builders.build("instructions", builders.instruction_rows(res.manifest), str(tmp_path / "ds"), quiet=True)
  assert result.report["kept"] == 2 and result.report["skipped"] == {}
  import tensorflow_datasets as tfds

  ds = tfds.builder_from_directory(result.path).as_data_source("train")
  c1 = next(ds[i] for i in range(len(ds)) if ds[i]["id"] == b"c1")
  assert [v.decode() for v in c1["values"]] == ["<audio>", "Paris.", "<audio>", "Berlin."]
  assert [v.decode() for v in c1["transcripts"]] == ["What is the capital of France?", "And of Germany?"]
  lengths = [sf.info(str(out / t["audio"])).frames for t in written[0]["conversations"] if "audio" in t]
  assert list(c1["audio_lengths"]) == lengths


def test_bad_utterances_are_counted_not_fatal(tmp_path, capsys):
  rows = [{"id": "ok1", "text": "the first good sentence"},
          {"id": "empty", "text": ""},
          {"id": "dots", "text": "..."},
          {"id": "xx", "text": "hello", "language": "xx"},
          {"id": "long", "text": "this sentence is much too long for the four second limit that this test run sets, "
                                 "since it goes on and on for more than twenty words"},
          {"id": "marker", "text": "say <au_patch> now"},
          {"id": "page", "text": "a whole page of text " * 20},
          {"id": "ok1", "text": "a duplicate id"},
          {"text": "  the second good sentence  ", "language": "en-GB"}]
  src = write_jsonl(tmp_path / "rows.jsonl", rows)
  with open(src, "a", encoding="utf-8") as f:
    f.write('{"id": "broken", "text": \n')
  res = synth.synthesize(synth.plan_text(src), str(tmp_path / "out"), options=synth.Options(max_seconds=4.0),
                         quiet=True)
  r = res.report
  assert r["failed_by_reason"] == {"bad_row": 1, "bad_text": 1, "duplicate_id": 1, "empty_text": 1, "silent": 1,
                                   "too_long": 2, "unsupported_language": 1}
  assert (r["utterances"], r["made"], r["failed"]) == (10, 2, 8)
  by_id = {f["id"]: f for f in r["failures"]}
  assert "419 characters" in by_id["page"]["message"] and "longer than the 4 s maximum" in by_id["long"]["message"]
  assert "xx" in by_id["xx"]["message"] and by_id["long"]["where"] == "rows.jsonl:5"
  written = [json.loads(line) for line in open(res.manifest, encoding="utf-8")]
  assert [w["text"] for w in written] == ["the first good sentence", "the second good sentence"]
  assert written[1]["language"] == "en"
  result = builders.build("asr", builders.asr_rows(manifest=res.manifest), str(tmp_path / "ds"), quiet=True)
  assert result.report["skipped"] == {} and result.report["kept"] == 2


class ToneEngine:
  """A stand-in TTS: a tone whose pitch comes from the rng and whose length follows the text."""

  def synthesize(self, text, language, rng):
    if "boom" in text:
      raise RuntimeError("cannot say boom")
    t = np.arange(int(0.05 * SR * len(text))) / SR
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t)).astype(np.float32)


def broken_engine():
  raise OSError("no such voice model")


def test_pluggable_engine_and_cli(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(tts.ENGINES, "tone", "tests.data.test_synth:ToneEngine")
  src = tmp_path / "s.txt"
  src.write_text("one two three\nboom\nfour five six seven\n8 9\n", encoding="utf-8")
  plan = synth.plan_text(str(src))
  res = synth.synthesize(plan, str(tmp_path / "tone"), options=synth.Options(engine="tone"), workers=1, quiet=True)
  assert (res.report["made"], res.report["failed_by_reason"]) == (3, {"engine_error": 1})
  assert "cannot say boom" in res.report["failures"][0]["message"]
  made = [json.loads(line) for line in open(res.manifest, encoding="utf-8")]
  assert [sf.info(str(tmp_path / "tone" / m["audio"])).frames for m in made] == [int(0.05 * SR * len(m["text"])) for m in made]
  with pytest.raises(synth.SynthError, match="no such voice model"):
    synth.synthesize(plan, str(tmp_path / "broken"), options=synth.Options(engine="tests.data.test_synth:broken_engine"),
                     workers=1, quiet=True)
  with pytest.raises(synth.SynthError, match="unknown"):
    synth.synthesize(plan, str(tmp_path / "x"), options=synth.Options(engine="nope"), quiet=True)

  # The command line: espeak, two sentences of four, wav files. (cli imports JAX: imported here so
  # that the engine's spawned workers, which import this module, start without it.)
  from llasm_jax import cli

  out = tmp_path / "cli"
  assert cli.main(["data", "synth", "--text", str(src), "--out", str(out), "--workers", "0", "--limit", "2",
                   "--format", "wav"]) == 0
  printed = capsys.readouterr().out
  assert "made 2, kept 0" in printed and "s of audio per second" in printed
  rows = [json.loads(line) for line in open(out / "manifest.jsonl", encoding="utf-8")]
  assert [r["text"] for r in rows] == ["one two three", "boom"] and all(r["audio"].endswith(".wav") for r in rows)
  assert cli.main(["data", "synth", "--instructions", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
  assert "not found" in capsys.readouterr().err
