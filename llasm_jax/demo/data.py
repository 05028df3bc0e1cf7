"""The demo's data phases: texts, the LLM's typed answers, speech in two voices, TFDS datasets, cached
Whisper outputs; and the names of the sets they make."""

from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm

from llasm_jax.demo.common import HELD_OUT, RECORDED, SYSTEM, TEMPLATE, VOICES, Options, log
from llasm_jax.errors import UserError


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
