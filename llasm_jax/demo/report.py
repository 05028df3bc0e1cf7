"""The demo's evaluation and report: every held-out set scored for the model and for Whisper alone, the
loss curve, and the printed summary."""

from __future__ import annotations

import json
from typing import Any

from llasm_jax.demo.common import HELD_OUT, RECORDED, SYSTEM, TEMPLATE, Options, Phases, log
from llasm_jax.demo.data import base_set, held_out_sets


def _max_tokens(name: str, opts: Options) -> int:
  if name.startswith("questions"):
    return opts.answer_tokens
  return 96 if name == RECORDED else 40  # read book sentences run longer than the spoken ones


def evaluate_model(model: str, caches: dict[str, str], opts: Options) -> dict[str, Any]:
  """Greedy answers of `model` on every held-out set, scored (WER after Whisper's English
  normalizer for sentences, token F1 against the typed answers for questions)."""
  from llasm_jax.data import pipeline
  from llasm_jax.infer import evaluate
  from llasm_jax.infer.generator import Generator

  generator = Generator.load(model, template=TEMPLATE, system=SYSTEM)
  out = {}
  for name in held_out_sets(caches):
    source = pipeline.Source(caches[name])
    rows = evaluate.read_rows(source)
    answers = evaluate.LlasmAnswers.for_source(generator, source, template=TEMPLATE, system=SYSTEM,
                                               max_new_tokens=_max_tokens(name, opts))
    out[name] = _scored(evaluate.run(rows, answers, batch=32), name)
    if generator.cfg.ctc and not name.startswith("questions"):
      # What the adaptor alone spells (greedy CTC, no LLM): the speech side apart from the LLM's reading.
      spelled = evaluate.run(rows, evaluate.CtcAnswers.for_source(generator, source), batch=64)
      log(f"  {name}, the adaptor alone (CTC): {spelled.summary()}")
      out[name]["ctc_totals"] = spelled.totals
  return out


def whisper_ceiling(whisper: str, datasets: dict[str, str], opts: Options) -> dict[str, Any]:
  """Whisper's own greedy transcripts of every held-out sentence set (the spoken audio, not cached)."""
  from llasm_jax.data import pipeline
  from llasm_jax.infer import evaluate
  from llasm_jax.infer.transcribe import Transcriber

  transcriber = Transcriber.load(whisper)  # loaded and compiled once for all the sets
  out = {}
  for name in (n for n in held_out_sets(datasets) if not n.startswith("questions")):
    answers = evaluate.WhisperAnswers(transcriber, _max_tokens(name, opts), batch_size=16)
    out[name] = _scored(evaluate.run(evaluate.read_rows(pipeline.Source(datasets[name])), answers, batch=16),
                        f"{name} (Whisper)")
  return out


def _scored(report, name: str) -> dict[str, Any]:
  log(f"  {name}: {report.summary()}")
  return {"totals": report.totals,
          "rows": [{"id": r.id, "reference": r.reference, "hypothesis": r.hypothesis, "score": r.score}
                   for r in report.rows]}


def plot_loss(histories: dict[str, list[dict[str, Any]]], path: str) -> str | None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log("  (no matplotlib: pip install -e '.[demo]' for the loss curve)")
    return None
  fig, axes = plt.subplots(1, len(histories), figsize=(6 * len(histories), 4), squeeze=False)
  titles = {"warm": "warm phase: CTC alone", "train": "CE phase (+ CTC auxiliary)"}
  for ax, (phase, history) in zip(axes[0], histories.items()):
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per target token)")
    ax.set_title(f"llasm-jax demo, {titles.get(phase, phase)}")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------------
# Report


def _cut(text: str, width: int) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= width else text[:width - 1] + "…"


def summary_table(after: dict, whisper: dict) -> list[str]:
  """One line per held-out set: Whisper's score, the model's, and (models trained with CTC) what the
  adaptor alone spells."""
  lines = [f"{'set':<24} {'metric':<7} {'Whisper alone':>13} {'model':>9} {'adaptor (CTC)':>14}   what"]
  for name in after:
    metric = "f1" if name.startswith("questions") else "wer"
    fmt = (lambda v: f"{v:.3f}") if metric == "f1" else (lambda v: f"{100 * v:.1f}%")
    ceiling = fmt(whisper[name]["totals"][metric]) if name in whisper else "-"
    spelled = fmt(after[name]["ctc_totals"][metric]) if "ctc_totals" in after[name] else "-"
    what = HELD_OUT.get(base_set(name), "people reading books (LibriVox), recorded")
    voice = name[len(base_set(name)) + 1:] or "recorded"
    lines.append(f"{name:<24} {metric:<7} {ceiling:>13} {fmt(after[name]['totals'][metric]):>9} {spelled:>14}   "
                 f"{what} ({voice})")
  return lines


def report(phases: Phases, after: dict, whisper: dict, answers: dict[str, str], texts: dict,
           trained: dict[str, dict]) -> str:
  lines = ["", "=" * 100, "llasm-jax demo: results on held-out data (never trained on)", ""]
  lines += summary_table(after, whisper)
  cov = texts["coverage_everyday"]
  lines += ["", f"the training text holds {100 * cov['type_share']:.1f}% of the everyday sentences' word types "
                f"({100 * cov['token_share']:.1f}% of their words)", "", "held-out transcriptions:"]
  for name in [n for n in after if not n.startswith("questions")]:
    for row in after[name]["rows"][:3]:
      lines.append(f"  {100 * row['score']:5.1f}%  ref: {_cut(row['reference'], 80)}  [{name}]")
      lines.append(f"  {'':6}  hyp: {_cut(row['hypothesis'], 80)}")
  questions = {}  # row id -> the question as typed
  for name in (n for n in answers if n.startswith("questions_held")):
    with open(answers[name], encoding="utf-8") as f:
      for row in map(json.loads, filter(str.strip, f)):
        questions[row["id"]] = row["conversations"][0]["value"]
  lines += ["", "spoken questions: the model hearing them, and the LLM reading them typed:"]
  for row in next((after[n]["rows"] for n in after if n.startswith("questions")), [])[:3]:
    lines.append(f"  Q (spoken): {questions.get(row['id'], row['id'])}")
    lines.append(f"    model (audio): {_cut(row['hypothesis'], 85)}")
    lines.append(f"    LLM (typed):   {_cut(row['reference'], 85)}")
    lines.append(f"    token F1 {row['score']:.2f}")
  lines += ["", "wall time per phase:"]
  for name, s in phases.seconds().items():
    lines.append(f"  {name:<10} {s:8.1f} s")
  lines.append(f"  {'total':<10} {sum(phases.seconds().values()):8.1f} s")
  for phase, t in trained.items():
    cut = "" if t["steps"] >= t["planned_steps"] else f" (of {t['planned_steps']} planned: the machine slowed)"
    lines.append(f"{phase}: {t['steps']} steps{cut}, {t['samples']} samples seen, {t['samples_per_s']:.1f} samples/s, "
                 f"loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}")
  model = trained["train"]["model"]
  lines += ["", "go on:", f"  llasm-jax chat --ckpt {model}   (the folder records its template)",
            "  (type a question, or the path of an audio file to send it)",
            "the same recipe at 7B on a TPU pod (Whisper large-v2 + LLaMA-2-7B; see README 'From the demo to 7B'):",
            "  llasm-jax convert --llm Llama-2-7b-chat/ --whisper whisper-large-v2/ --mode encoder --out gs://B/fresh",
            "  llasm-jax data encode --ckpt gs://B/fresh --data /mnt/data/asr --out /mnt/data/asr_cached",
            "  launch/tpu.sh run -- train --config configs/llasm_cllama2_7b.py:stage1 --workdir gs://B/stage1 \\",
            "      --config.train.init_from=gs://B/fresh --config.data.source=tfds --config.data.dir=/mnt/data/asr_cached",
            "=" * 100]
  return "\n".join(lines)
