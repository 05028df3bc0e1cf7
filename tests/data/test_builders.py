"""TFDS builders: planted bad rows are skipped and reported by reason, nothing valid is lost; source layouts; CLI."""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from llasm_jax import cli
from llasm_jax.data import builders
from llasm_jax.data.audio import load_audio, to_int16

SR = 16000


def read_dataset(path):
  import tensorflow_datasets as tfds

  src = tfds.builder_from_directory(path).as_data_source("train")
  return [src[i] for i in range(len(src))]


def plant(folder, assets):
  """Valid clips from the shared assets plus one of each kind of bad input."""
  folder.mkdir(exist_ok=True)
  shutil.copy(os.path.join(assets, "speech_zh", "llasm_example_0.mp3"), folder / "ok.mp3")
  (folder / "corrupt.mp3").write_bytes(b"ID3\x03\x00" + np.random.default_rng(0).bytes(4000))
  (folder / "zero.wav").write_bytes(b"")
  sf.write(folder / "no_samples.wav", np.zeros(0, np.float32), SR)
  sf.write(folder / "silent.wav", np.zeros(SR, np.int16), SR)
  sf.write(folder / "long.flac", (0.1 * np.random.default_rng(1).standard_normal(31 * SR)).astype(np.float32), SR)


def test_asr_build_with_planted_bad_rows(tmp_path, assets):
  src = tmp_path / "src"
  plant(src, assets)
  good = [{"audio": "ok.mp3", "text": "请介绍一下勾股定理", "language": "zh"},
          {"audio": os.path.join(assets, "speech_en", "weather.flac"), "text": "what will the weather be like"},
          {"audio": os.path.join(assets, "speech_en", "counting.ogg"), "text": "one two three", "language": "en"}]
  bad = {"corrupt.mp3": "unreadable", "zero.wav": "empty", "no_samples.wav": "empty", "silent.wav": "silent",
         "long.flac": "too_long", "missing.wav": "missing"}
  lines = [json.dumps(good[0])]
  lines += [json.dumps({"audio": name, "text": "x", "language": "en"}) for name in bad]
  lines += [json.dumps(good[1]), '{"audio": "ok.mp3", "text": "broken" ', json.dumps({"audio": "ok.mp3"}),
            json.dumps({"audio": "ok.mp3", "text": " "}), json.dumps({"audio": "ok.mp3", "text": "x" * 5000}),
            json.dumps(good[2])]
  (src / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

  result = builders.build("asr", builders.manifest_rows(str(src / "manifest.jsonl")), str(tmp_path / "out"),
                          max_skip_share=0.9, quiet=True)
  report = json.load(open(result.report_path))
  assert result.report_path == str(tmp_path / "out" / "llasm_asr" / "build_report.json")
  assert report["status"] == "ok" and report["rows_read"] == len(lines) and report["kept"] == 3
  by_file = {os.path.basename(r["file"]): r for r in report["skipped_rows"] if r["file"]}
  for name, reason in bad.items():
    assert by_file[name]["reason"] == reason and name in by_file[name]["message"], by_file.get(name)
  by_line = {r["where"]: r for r in report["skipped_rows"]}
  assert by_line["manifest.jsonl:9"]["reason"] == "bad_row" and "malformed JSON" in by_line["manifest.jsonl:9"]["message"]
  assert by_line["manifest.jsonl:10"]["reason"] == "bad_row" and "'text'" in by_line["manifest.jsonl:10"]["message"]
  assert by_line["manifest.jsonl:11"]["reason"] == "empty_text"
  assert by_line["manifest.jsonl:12"]["reason"] == "text_too_long"
  assert report["skipped"] == {"bad_row": 2, "empty": 2, "empty_text": 1, "missing": 1, "silent": 1,
                               "text_too_long": 1, "too_long": 1, "unreadable": 1}

  # Nothing valid lost: every good row is there, with its audio decoded to 16 kHz int16.
  rows = {r["text"].decode(): r for r in read_dataset(result.path)}
  assert set(rows) == {g["text"] for g in good}
  for g in good:
    path = g["audio"] if os.path.isabs(g["audio"]) else str(src / g["audio"])
    r = rows[g["text"]]
    np.testing.assert_array_equal(r["audio"], to_int16(load_audio(path)))
    assert r["language"].decode() == g.get("language", "en") and r["source"].decode() == path


def test_instructions_build(tmp_path, assets):
  src = tmp_path / "src"
  plant(src, assets)
  weather, counting = (os.path.join(assets, "speech_en", f) for f in ("weather.wav", "counting.ogg"))
  items = [
      {"id": "turn", "conversations": [{"from": "human", "value": "what is the weather", "audio": weather},
                                       {"from": "gpt", "value": "Sunny."}]},
      {"id": "sample", "audio": [counting, "ok.mp3"], "conversations": [
          {"from": "human", "value": "count"}, {"from": "gpt", "value": "1 2 3"},
          {"from": "human", "value": "pythagoras"}, {"from": "gpt", "value": "a^2 + b^2 = c^2"}]},
      {"id": "placeholders", "audio": ["ok.mp3", weather], "conversations": [
          {"from": "human", "value": "Compare <audio> with <audio>."}, {"from": "gpt", "value": "Different."}]},
      {"id": "corrupt", "conversations": [{"from": "human", "value": "x", "audio": "corrupt.mp3"},
                                          {"from": "gpt", "value": "y"}]},
      {"id": "gpt_first", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
      {"id": "count", "audio": ["ok.mp3"], "conversations": [
          {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
          {"from": "gpt", "value": "d"}]},
      {"id": "missing", "conversations": [{"from": "human", "value": "x", "audio": "gone.wav"},
                                          {"from": "gpt", "value": "y"}]},
  ]
  lines = [json.dumps(i) for i in items[:3]] + ['{"id": "broken", "conversations": ['] + \
          [json.dumps(i) for i in items[3:]]
  (src / "conv.jsonl").write_text("\n".join(lines), encoding="utf-8")
  # Workers in spawned processes, as the CLI runs it.
  result = builders.build("instructions", builders.instruction_rows(str(src / "conv.jsonl")),
                          str(tmp_path / "out"), workers=2, max_skip_share=0.9, quiet=True)
  report = result.report
  reasons = {r["where"]: r["reason"] for r in report["skipped_rows"]}
  assert reasons == {"conv.jsonl:4": "bad_row", "conv.jsonl:5": "unreadable", "conv.jsonl:6": "bad_row",
                     "conv.jsonl:7": "bad_row", "conv.jsonl:8": "missing"}
  rows = {r["id"].decode(): r for r in read_dataset(result.path)}
  assert set(rows) == {"turn", "sample", "placeholders"}
  assert [v.decode() for v in rows["turn"]["values"]] == ["<audio>", "Sunny."]  # a spoken turn
  assert [v.decode() for v in rows["sample"]["values"]] == ["<audio>", "1 2 3", "<audio>", "a^2 + b^2 = c^2"]
  assert [v.decode() for v in rows["placeholders"]["values"]] == ["Compare <audio> with <audio>.", "Different."]
  # What each audio says, for the distillation teacher: the text a spoken turn replaced, "" if unknown.
  assert [v.decode() for v in rows["turn"]["transcripts"]] == ["what is the weather"]
  assert [v.decode() for v in rows["sample"]["transcripts"]] == ["count", "pythagoras"]
  assert [v.decode() for v in rows["placeholders"]["transcripts"]] == ["", ""]
  r = rows["sample"]
  assert r["roles"].tolist() == [0, 1, 0, 1]
  clips = [to_int16(load_audio(p)) for p in (counting, str(src / "ok.mp3"))]
  assert r["audio_lengths"].tolist() == [len(c) for c in clips]
  np.testing.assert_array_equal(r["audio"], np.concatenate(clips))


def test_librispeech_and_aishell_layouts(tmp_path):
  rng = np.random.default_rng(0)

  def clip(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (rng.standard_normal(SR // 2) * 2000).astype(np.int16), SR)

  ls = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
  for i in range(3):
    clip(ls / f"84-121123-000{i}.flac")
  (ls / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE\n"
                                          "84-121123-0002 AT THIS MOMENT\n84-121123-0003 NO SUCH FILE\n")
  ai = tmp_path / "data_aishell"
  clip(ai / "wav" / "train" / "S0002" / "BAC009S0002W0122.wav")
  clip(ai / "wav" / "dev" / "S0724" / "BAC009S0724W0121.wav")
  (ai / "transcript").mkdir()
  (ai / "transcript" / "aishell_transcript_v0.8.txt").write_text(
      "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\nBAC009S0724W0121 甚至 出现 交易 几乎 停滞 的 情况\n"
      "BAC009S0999W0001 没有 音频\n", encoding="utf-8")
  rows = builders.asr_rows(librispeech=str(tmp_path / "LibriSpeech"), aishell=str(ai))
  assert [r.index for r in rows] == list(range(7))
  result = builders.build("asr", rows, str(tmp_path / "out"), quiet=True)
  got = {r["id"].decode(): (r["text"].decode(), r["language"].decode()) for r in read_dataset(result.path)}
  assert got == {"84-121123-0000": ("go do you hear", "en"), "84-121123-0001": ("but in less than five", "en"),
                 "84-121123-0002": ("at this moment", "en"), "BAC009S0002W0122": ("而对楼市成交抑制作用最大的限购", "zh"),
                 "BAC009S0724W0121": ("甚至出现交易几乎停滞的情况", "zh")}
  missing = sorted(os.path.basename(r["file"]) for r in result.report["skipped_rows"])
  assert missing == ["84-121123-0003.flac", "BAC009S0999W0001.wav"]


def test_build_fails_clearly(tmp_path):
  with pytest.raises(builders.BuildError, match="not found"):
    builders.manifest_rows(str(tmp_path / "nope.jsonl"))
  (tmp_path / "bad.json").write_text('[{"id": 1}, {', encoding="utf-8")
  with pytest.raises(builders.BuildError, match="not valid JSON"):
    builders.instruction_rows(str(tmp_path / "bad.json"))
  (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"audio": f"gone{i}.wav", "text": "x"}) for i in range(4)))
  out = tmp_path / "out"
  with pytest.raises(builders.BuildError, match="max-skip-share"):
    builders.build("asr", builders.manifest_rows(str(tmp_path / "m.jsonl")), str(out), quiet=True)
  report = json.load(open(out / "llasm_asr" / "build_report.json"))
  assert report["status"] == "failed" and report["skipped"] == {"missing": 3}  # stopped as soon as it was clear
  assert not os.path.exists(out / "llasm_asr" / "1.0.0")


def test_cli_build_prints_summary(tmp_path, capsys, assets):
  out = tmp_path / "out"
  assert cli.main(["data", "build", "asr", "--manifest", os.path.join(assets, "manifest.jsonl"), "--out", str(out),
                   "--workers", "0"]) == 0
  printed = capsys.readouterr()
  assert "rows read 7, kept 7, skipped 0" in printed.out and "llasm_asr/1.0.0" in printed.out
  assert cli.main(["data", "build", "asr", "--manifest", os.path.join(assets, "manifest.jsonl"), "--out", str(out),
                   "--workers", "0"]) == 2
  assert "exists; pass --overwrite" in capsys.readouterr().err
  assert cli.main(["data", "build", "instructions", "--json", str(tmp_path / "none.json"), "--out", str(out)]) == 2
  assert "not found" in capsys.readouterr().err


def test_token_budget(tmp_path, tokenizer_dir, assets):
  weather = os.path.join(assets, "speech_en", "weather.flac")
  lines = [json.dumps({"audio": weather, "text": "hello world"}),
           json.dumps({"audio": weather, "text": " ".join(["hello world"] * 20)})]
  (tmp_path / "m.jsonl").write_text("\n".join(lines))
  options = builders.Options(max_text_tokens=12, tokenizer=tokenizer_dir)
  result = builders.build("asr", builders.manifest_rows(str(tmp_path / "m.jsonl")), str(tmp_path / "out"),
                          options=options, quiet=True)
  assert result.report["kept"] == 1 and result.report["skipped"] == {"text_too_long": 1}
  assert "more than --max-text-tokens 12" in result.report["skipped_rows"][0]["message"]
