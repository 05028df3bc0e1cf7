"""Spoken training data from text: TTS over sentence lists or conversations -> audio files + builder JSONL.

LLaSM-Audio-Instructions were made this way: text dialogues whose human turns were read out by
a TTS engine. `llasm-jax data synth --text FILE | --instructions FILE --out DIR` writes

- DIR/audio/<xx>/<id>.flac (or .wav): 16 kHz mono 16-bit, one file per utterance, named after
  the utterance id (safe characters only), in 256 sub-folders by a hash of the id;
- DIR/manifest.jsonl ({"id", "audio", "text", "language"}, what `data build asr --manifest`
  reads) or DIR/instructions.jsonl (the input conversations, each human turn given
  `"audio": path` and keeping its text as the transcript: what `data build instructions
  --json` reads); audio paths are relative to DIR;
- DIR/synth_report.json: counts, failures with reasons, hours of audio, wall time.

Inputs:
- `--text`: one sentence per line (blank lines skipped), or JSONL (`.jsonl` / `.json`, or
  lines starting with "{") of {"text", "id"?, "language"?}; other keys are passed through.
  Without an id, a row is named by its position and a hash of its text ("0000012-3fa9c1d2"),
  so an edited line is spoken again instead of keeping the old audio.
- `--instructions`: a JSON array or JSONL of {"id", "conversations": [{"from": "human" |
  "gpt", "value"}, ...]} (LLaSM / ShareGPT): every human turn is spoken, as utterance
  "<id>_<turn index>"; gpt turns stay text. A conversation is written only if all its
  human turns were made (its other turns' audio is kept for a rerun).

Language: a row's "language" ("en", "zh", "cmn", "zh-CN", ...), else `language`, else
detected: Mandarin when the text holds at least as many CJK ideographs as Latin words.

Voices are drawn per utterance from an rng seeded by (seed, utterance id): reruns give the
same samples, whichever worker renders an utterance and in whatever order. Resumable: an
utterance whose file exists is kept, not redone (files are written under a temporary name and
renamed, so an existing file is complete). Failures (empty text, unknown language, silent or
too long output, engine errors) are counted with their reason, never fatal one by one.

Engines: `tts.py` (their contract, "espeak" and "piper" built in, others registered or named as
"module:callable").
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import time
from typing import Any

import numpy as np

from llasm_jax.data import augment
from llasm_jax.data.audio import SAMPLE_RATE, AudioError, check_audio, to_int16
from llasm_jax.data.jobs import ordered_map, say, write_jsonl
from llasm_jax.data.rows import BuildError, Row, Skip, json_rows, parse_conversation, read_text
from llasm_jax.data.tts import (SynthError, UtteranceError, engine_factory, engine_instance, normalize_language,
                                utterance_rng)
from llasm_jax.tokens import AUDIO, MARKERS

FORMATS = ("flac", "wav")
MANIFEST = {"asr": "manifest.jsonl", "instructions": "instructions.jsonl"}
REPORT = "synth_report.json"
AUDIO_DIR = "audio"
PRINT_FAILURES = 20
# No voice speaks this many characters a second (fast English is ~20, Mandarin ~6): a longer text
# cannot fit --max-seconds, and is failed before it costs a synthesis (chat turns can be pages).
MAX_CHARS_PER_SECOND = 40


# ---------------------------------------------------------------------------------------------
# Utterances: ids and file names (languages and seeds: tts.py).


def _digest(text: str) -> str:
  return hashlib.sha1(text.encode("utf-8")).hexdigest()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_stem(uid: str) -> str:
  """A file name for utterance id `uid`: the id itself if it is made of [A-Za-z0-9._-] (at most
  80, not starting with "."), else a cleaned form plus a hash of the id, so ids never collide."""
  stem = _UNSAFE.sub("_", uid)[:80].lstrip(".")
  return stem if stem == uid else f"{stem}-{_digest(uid)[:10]}"


def audio_path(uid: str, fmt: str) -> str:
  """DIR-relative path of an utterance's audio: audio/<2 hex of a hash of the id>/<stem>.<fmt>.
  The shard depends only on the id, so resuming with more or fewer inputs finds the same files."""
  return f"{AUDIO_DIR}/{_digest(uid)[:2]}/{file_stem(uid)}.{fmt}"


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One text to speak. `where` says where it came from (file:line or file[index])."""

  id: str
  text: str
  language: str
  where: str
  audio: str  # where its audio goes, relative to the output folder (audio_path)


@dataclasses.dataclass(frozen=True)
class Failure:
  """An utterance (or conversation) that was not made, counted under `reason`."""

  id: str
  where: str
  reason: str
  message: str


@dataclasses.dataclass(frozen=True)
class Output:
  """One line of the output JSONL (its audio paths filled in), written once every utterance it
  `needs` (ids) exists."""

  row: dict[str, Any]
  needs: list[str]
  where: str


@dataclasses.dataclass
class Plan:
  """What an input asks for: the utterances to speak and the lines to write once they exist."""

  kind: str  # "asr" | "instructions"
  fmt: str  # audio file format, "flac" | "wav"
  utterances: list[Utterance] = dataclasses.field(default_factory=list)
  outputs: list[Output] = dataclasses.field(default_factory=list)
  failures: list[Failure] = dataclasses.field(default_factory=list)  # utterances found bad while reading
  conversation_failures: list[Failure] = dataclasses.field(default_factory=list)  # bad conversations


def _is_jsonl(path: str, text: str) -> bool:
  if path.endswith((".jsonl", ".json")):
    return True
  first = next((line for line in text.splitlines() if line.strip()), "")
  return first.lstrip().startswith("{")


def _check_text(text: str) -> None:
  if not text.strip():
    raise UtteranceError("empty_text", "empty text: nothing to speak")
  for marker in MARKERS + (AUDIO,):
    if marker in text:
      raise UtteranceError("bad_text", f"text contains the audio marker {marker!r}, which the builders reject")


def _given_id(item: dict[str, Any]) -> str:
  uid = item.get("id")
  return "" if uid is None else str(uid).strip()


def _check_request(fmt: str, limit: int | None) -> None:
  if fmt not in FORMATS:
    raise SynthError(f"--format {fmt!r}: expected one of {FORMATS}")
  if limit is not None and limit < 1:
    raise SynthError(f"--limit {limit}: expected a positive number of rows")


def plan_text(path: str, fmt: str = "flac", language: str | None = None, limit: int | None = None) -> Plan:
  """The plan of an ASR sentence list: a text file (one sentence a line) or JSONL {"text", "id"?, "language"?}."""
  _check_request(fmt, limit)
  raw = read_text(path, "--text")  # the builders' reader: the same errors
  name = os.path.basename(path)
  if _is_jsonl(path, raw):
    rows = json_rows(path, "--text file")  # the builders' reader: the same JSON is accepted
  else:
    rows = [Row(i, f"{name}:{n}", {"text": line.strip()})
            for i, (n, line) in enumerate((n, l) for n, l in enumerate(raw.splitlines(), 1) if l.strip())]
  plan = Plan("asr", fmt)
  seen: set[str] = set()
  for row in rows[:limit]:
    item = row.data or {}
    text = item.get("text")
    uid = _given_id(item) or f"{row.index:07d}-{_digest(str(text))[:8]}"
    try:
      if row.error is not None:
        raise UtteranceError("bad_row", row.error)
      if not isinstance(text, str):
        raise UtteranceError("bad_row", "field 'text' missing or not a string")
      if uid in seen:
        raise UtteranceError("duplicate_id", f"id {uid!r} is used by an earlier row; ids name the audio files")
      _check_text(text)
      lang = item.get("language", language)
      lang = normalize_language(lang if isinstance(lang, str) else None, text)
    except UtteranceError as e:
      plan.failures.append(Failure(uid, row.where, e.reason, str(e)))
      continue
    seen.add(uid)
    text = text.strip()
    plan.utterances.append(Utterance(uid, text, lang, row.where, audio_path(uid, fmt)))
    plan.outputs.append(Output({**item, "id": uid, "audio": audio_path(uid, fmt), "text": text, "language": lang},
                               [uid], row.where))
  return plan


def plan_instructions(path: str, fmt: str = "flac", language: str | None = None, limit: int | None = None) -> Plan:
  """The plan of LLaSM / ShareGPT conversations: every human turn becomes an utterance."""
  _check_request(fmt, limit)
  try:
    rows = json_rows(path, "--instructions file")
  except BuildError as e:
    raise SynthError(str(e)) from None
  plan = Plan("instructions", fmt)
  seen: set[str] = set()
  for row in rows[:limit]:
    item = row.data or {}
    cid = _given_id(item) or f"{row.index:07d}-{_digest(json.dumps(item, sort_keys=True))[:8]}"
    try:
      if row.error is not None:
        raise Skip("bad_row", row.error)
      if "audio" in item or any(isinstance(t, dict) and "audio" in t for t in item.get("conversations") or []):
        raise Skip("has_audio", "the conversation already holds audio; give text-only conversations")
      out, turns = dict(item), []
      out["id"] = cid
      conv = item.get("conversations")
      out["conversations"] = [dict(t) if isinstance(t, dict) else t for t in conv] if isinstance(conv, list) else conv
      for k, turn in enumerate(out["conversations"] if isinstance(conv, list) else []):
        if isinstance(turn, dict) and str(turn.get("from", "")).lower() in ("human", "user"):
          uid = f"{cid}_{k}"
          turn["audio"] = audio_path(uid, fmt)
          turns.append((uid, k, turn.get("value"), turn["audio"]))
      if any(isinstance(text, str) and AUDIO in text for _, _, text, _ in turns):
        raise Skip("has_audio", f"a human turn holds the {AUDIO} placeholder; give text-only turns")
      # The instructions builder's own parser: what it rejects is not worth synthesizing.
      parse_conversation(out, os.path.dirname(os.path.abspath(path)))
    except Skip as s:
      plan.conversation_failures.append(Failure(cid, row.where, s.reason, s.message))
      continue
    given = item.get("language", language)
    given = given if isinstance(given, str) else None
    needs = []
    for uid, k, text, audio in turns:
      where = f"{row.where} turn {k}"
      try:
        if uid in seen:
          raise UtteranceError("duplicate_id", f"utterance id {uid!r} is used by an earlier conversation "
                               "(conversation ids must be unique)")
        _check_text(text)
      except UtteranceError as e:
        plan.failures.append(Failure(uid, where, e.reason, str(e)))
        needs.append(uid)  # never made: the conversation is not written
        continue
      seen.add(uid)
      plan.utterances.append(Utterance(uid, text.strip(), normalize_language(given, text), where, audio))
      needs.append(uid)
    if "language" not in out:
      out["language"] = normalize_language(given, " ".join(t for _, _, t, _ in turns))
    plan.outputs.append(Output(out, needs, row.where))
  return plan


# ---------------------------------------------------------------------------------------------
# Rendering (in worker processes: one engine each, since espeak-ng is process-global state).


@dataclasses.dataclass(frozen=True)
class Options:
  """How utterances are rendered and which outputs are kept."""

  engine: str = "espeak"
  seed: int = 0
  min_seconds: float = 0.1
  max_seconds: float | None = 30.0  # what the builders keep by default (llasm mode sees 30 s)
  silence_peak: float = 1e-4
  # Augmentation after the engine (augment.py): reverb from a folder of impulse responses or
  # "builtin" (synthetic rooms), noise at an SNR drawn from snr_db; each with its probability.
  reverb: str | None = None
  reverb_p: float = 0.5
  snr_db: tuple[float, float] | None = None
  noise_p: float = 0.5

  @property
  def augmentation(self) -> augment.Augment:
    return augment.Augment(reverb=self.reverb, reverb_p=self.reverb_p, snr_db=self.snr_db, noise_p=self.noise_p)


def write_audio(path: str, audio: np.ndarray) -> None:
  """float32[N] at 16 kHz -> a 16-bit file at `path` (flac or wav, by its extension), written under
  a temporary name and renamed, so a file that exists is whole (what resuming relies on)."""
  import soundfile as sf

  folder, name = os.path.split(path)
  os.makedirs(folder or ".", exist_ok=True)
  tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
  fmt = os.path.splitext(name)[1].lstrip(".").upper()
  try:
    sf.write(tmp, to_int16(audio), SAMPLE_RATE, format=fmt, subtype="PCM_16")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def render(utt: Utterance, out: str, options: Options) -> tuple[str, float, str, str]:
  """Speaks one utterance into its file under `out`: (id, seconds, "", "") or (id, 0, reason, message)."""
  path = os.path.join(out, utt.audio)
  try:
    if options.max_seconds and len(utt.text) > MAX_CHARS_PER_SECOND * options.max_seconds:
      raise AudioError(utt.id, "too_long", f"{len(utt.text)} characters of text cannot be spoken within the "
                       f"{options.max_seconds:g} s maximum (raise --max-seconds, 0 = no limit)")
    audio = engine_instance(options.engine).synthesize(utt.text, utt.language, utterance_rng(options.seed, utt.id))
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
      raise UtteranceError("engine_error", f"engine gave samples of shape {audio.shape}; expected float32[N] mono")
    if not np.all(np.isfinite(audio)):
      raise UtteranceError("engine_error", "engine gave NaN or Inf samples")
    if options.augmentation.active:  # its own rng: the voice drawn is the same with or without augmentation
      audio, _ = augment.augment(audio, utterance_rng(options.seed, f"{utt.id}\0augment"), options.augmentation)
    check_audio(audio, utt.id, min_seconds=options.min_seconds, max_seconds=options.max_seconds,
                silence_peak=options.silence_peak)
    write_audio(path, audio)
    return utt.id, len(audio) / SAMPLE_RATE, "", ""
  except SynthError:
    raise  # the engine cannot start: the whole run stops
  except AudioError as e:
    return utt.id, 0.0, e.reason, f"{e.detail} (text: {utt.text[:60]!r})"
  except OSError as e:
    return utt.id, 0.0, "write_error", f"cannot write {path!r}: {e}"
  except Exception as e:  # one odd text must not end a run of a million utterances; it is reported
    return utt.id, 0.0, getattr(e, "reason", "engine_error"), f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Result:
  out: str
  manifest: str  # DIR/manifest.jsonl or DIR/instructions.jsonl
  report_path: str
  report: dict[str, Any]


def _existing_seconds(path: str) -> float | None:
  """Seconds of audio in a finished file at `path`, or None if there is none (or it is unreadable)."""
  if not os.path.isfile(path):
    return None
  import soundfile as sf

  try:
    info = sf.info(path)
    return info.frames / info.samplerate
  except Exception:  # not ours or damaged: made again
    return None


def synthesize(plan: Plan, out: str, *, options: Options = Options(), workers: int = 0, quiet: bool = False,
               source: str = "") -> Result:
  """Speaks every utterance of `plan` into `out`/audio (keeping those already there), then writes
  the manifest / instructions JSONL of the rows whose audio all exists, and the report."""
  from tqdm import tqdm

  # Workers get the factory path: a name registered in this process means nothing to a spawned one.
  run_options = dataclasses.replace(options, engine=engine_factory(options.engine))
  if options.reverb not in (None, augment.BUILTIN):
    augment.load_impulses(options.reverb)  # an unusable folder stops the run here, not once per utterance
  t0 = time.time()
  os.makedirs(out, exist_ok=True)
  for stale in glob.glob(os.path.join(out, AUDIO_DIR, "*", ".*.tmp")):  # left by a killed run
    os.remove(stale)
  failures = list(plan.failures)
  for f in failures[:PRINT_FAILURES]:
    say(f"fail {f.where} ({f.id}): {f.message} [{f.reason}]", quiet)
  seconds: dict[str, float] = {}
  jobs, kept_s = [], 0.0
  for u in plan.utterances:
    path = os.path.join(out, u.audio)
    existing = _existing_seconds(path)
    if existing is None:
      jobs.append(u)
    else:
      seconds[u.id] = existing
      kept_s += existing
  kept = len(seconds)
  where = {u.id: u.where for u in plan.utterances}
  made, made_s = 0, 0.0
  bar = tqdm(total=len(plan.utterances), initial=kept, desc=f"synthesizing ({options.engine})", unit="utt",
             disable=quiet, dynamic_ncols=True)
  try:
    # Batches: IPC per utterance would cost as much as espeak itself.
    size = max(1, min(16, len(jobs) // (8 * max(workers, 1))))
    for uid, secs, reason, message in ordered_map(functools.partial(render, out=out, options=run_options), jobs,
                                                  workers, batch=size):
      bar.update()
      if reason:
        failures.append(Failure(uid, where[uid], reason, message))
        if len(failures) <= PRINT_FAILURES:
          say(f"fail {where[uid]} ({uid}): {message} [{reason}]", quiet)
      else:
        made, made_s = made + 1, made_s + secs
        seconds[uid] = secs
      bar.set_postfix(made=made, kept=kept, failed=len(failures), refresh=False)
  finally:
    bar.close()
  wall = time.time() - t0

  rows, row_failures = [], list(plan.conversation_failures)
  for o in plan.outputs:
    missing = [uid for uid in o.needs if uid not in seconds]
    if not missing:
      rows.append(o.row)
    elif plan.kind == "instructions":
      row_failures.append(Failure(o.row["id"], o.where, "utterance_failed",
                                  f"{len(missing)} of its {len(o.needs)} human turns not made ({missing[0]}, ...)"))
  manifest = os.path.join(out, MANIFEST[plan.kind])
  write_jsonl(manifest, rows)
  report = {
      "kind": plan.kind, "source": source, "out": out, "engine": options.engine, "seed": options.seed,
      "format": plan.fmt, "workers": workers, "utterances": len(plan.utterances) + len(plan.failures),
      "made": made, "kept": kept, "failed": len(failures),
      "failed_by_reason": dict(sorted(collections.Counter(f.reason for f in failures).items())),
      "rows_written": len(rows), "audio_hours": round(sum(seconds.values()) / 3600, 5),
      "made_hours": round(made_s / 3600, 5), "kept_hours": round(kept_s / 3600, 5), "wall_s": round(wall, 2),
      "audio_s_per_s": round(made_s / wall, 2) if wall > 0 else 0.0,
      "failures": [dataclasses.asdict(f) for f in failures]}
  if plan.kind == "instructions":
    report["conversations"] = len(plan.outputs) + len(plan.conversation_failures)
    report["conversations_failed_by_reason"] = dict(sorted(collections.Counter(f.reason for f in row_failures).items()))
    report["conversation_failures"] = [dataclasses.asdict(f) for f in row_failures]
    for f in row_failures[:PRINT_FAILURES]:
      say(f"conversation {f.where or f.id} dropped: {f.message} [{f.reason}]", quiet)
  report_path = os.path.join(out, REPORT)
  with open(report_path, "w", encoding="utf-8") as f:
    json.dump(report, f, ensure_ascii=False, indent=1)
  return Result(out, manifest, report_path, report)


def summary(result: Result) -> str:
  """The lines printed at the end of a run."""
  r = result.report
  reasons = lambda counts: ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
  lines = [f"utterances {r['utterances']}: made {r['made']}, kept {r['kept']} (already there), failed "
           f"{r['failed']} ({reasons(r['failed_by_reason'])})"]
  if r["kind"] == "instructions":
    lines.append(f"conversations {r['conversations']}: written {r['rows_written']}, failed "
                 f"{r['conversations'] - r['rows_written']} ({reasons(r['conversations_failed_by_reason'])})")
  lines.append(f"audio {r['audio_hours']:.3f} h (made {r['made_hours']:.3f} h) in {r['wall_s']:.1f} s: "
               f"{r['audio_s_per_s']:.1f} s of audio per second ({r['engine']}, {r['workers']} workers)")
  lines.append(f"{r['kind']} JSONL {result.manifest} ({r['rows_written']} rows), report {result.report_path}")
  return "\n".join(lines)
