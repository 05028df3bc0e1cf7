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

Engines: `Engine.synthesize(text, language, rng) -> float32[N] at 16 kHz`; "espeak" (espeak-ng
through ctypes, `tts_espeak.py`) and "piper" (a neural English voice, `tts_piper.py`) are
built in, others register as "module:callable" (a
factory) with `register_engine`, or are named so directly (`--engine mypkg.tts:Engine`):
worker processes import them by that name.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import sys
import time
from typing import Any, Iterator, Protocol

import numpy as np

from llasm_jax.data import augment, builders
from llasm_jax.data.audio import SAMPLE_RATE, AudioError, check_audio, to_int16
from llasm_jax.errors import UserError

FORMATS = ("flac", "wav")
MANIFEST = {"asr": "manifest.jsonl", "instructions": "instructions.jsonl"}
REPORT = "synth_report.json"
AUDIO_DIR = "audio"
PRINT_FAILURES = 20
# No voice speaks this many characters a second (fast English is ~20, Mandarin ~6): a longer text
# cannot fit --max-seconds, and is failed before it costs a synthesis (chat turns can be pages).
MAX_CHARS_PER_SECOND = 40


class SynthError(UserError):
  """The run as a whole cannot go on (unreadable input, an engine that cannot start)."""


class UtteranceError(RuntimeError):
  """One utterance that cannot be made; engines raise it with a short `reason` to count it under."""

  def __init__(self, reason: str, message: str):
    self.reason = reason
    super().__init__(message)

  def __reduce__(self):
    return UtteranceError, (self.reason, str(self))


# ---------------------------------------------------------------------------------------------
# Engines.


class Engine(Protocol):
  """A text-to-speech engine; one instance per process, built by a no-argument factory."""

  def synthesize(self, text: str, language: str, rng: np.random.Generator) -> np.ndarray:
    """float32[N] samples in [-1, 1] at 16 kHz of `text` read in `language` ("en", "zh", ...),
    in a voice drawn from `rng` (the same rng state must give the same samples). An exception
    fails this utterance only; one with a `reason` attribute (UtteranceError) is counted under
    it, any other under "engine_error"."""
    ...


ENGINES: dict[str, str] = {"espeak": "llasm_jax.data.tts_espeak:EspeakEngine",
                           "piper": "llasm_jax.data.tts_piper:PiperEngine"}


def register_engine(name: str, factory: str) -> None:
  """Makes `--engine name` build an engine by calling `factory` ("package.module:callable").

  An import path, not a callable: worker processes are spawned fresh and find the engine by
  importing it. Register in the process that runs `synthesize`; workers receive the path.
  """
  if ":" not in factory:
    raise UserError(f"engine factory {factory!r}: expected 'package.module:callable'")
  ENGINES[name] = factory


def engine_factory(engine: str) -> str:
  """The "module:callable" path of a registered name, or `engine` itself if it is such a path."""
  if engine in ENGINES:
    return ENGINES[engine]
  if ":" in engine:
    return engine
  raise SynthError(f"--engine {engine!r}: unknown; registered engines are {sorted(ENGINES)}, "
                   "or name a factory as 'package.module:callable'")


def make_engine(engine: str) -> Engine:
  """An engine instance from a registered name or a "module:callable" path."""
  path = engine_factory(engine)
  module, _, attr = path.partition(":")
  try:
    factory = getattr(importlib.import_module(module), attr)
    made = factory()
  except Exception as e:
    raise SynthError(f"engine {engine!r} ({path}) cannot start: {type(e).__name__}: {e}") from None
  if not callable(getattr(made, "synthesize", None)):
    raise SynthError(f"engine {engine!r} ({path}) has no synthesize(text, language, rng) method")
  return made


# ---------------------------------------------------------------------------------------------
# Utterances: ids, languages, file names, seeds.

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_LANGUAGES = {"zh": "zh", "cmn": "zh", "chinese": "zh", "mandarin": "zh", "en": "en", "english": "en"}


def detect_language(text: str) -> str:
  """The language of `text`: "zh" when it holds at least as many CJK ideographs as Latin words (an
  ideograph is about a word), else "en"; so Chinese with an English name in it stays Chinese."""
  n_cjk = len(_CJK.findall(text))
  return "zh" if n_cjk and n_cjk >= len(_LATIN_WORD.findall(text)) else "en"


def normalize_language(language: str | None, text: str) -> str:
  """A row's language code as the engines and builders use it: "zh-CN"/"cmn" -> "zh", "en-US"
  -> "en", None/"" /"auto" -> detected from `text`, anything else (e.g. "fr") unchanged."""
  if not language or language.lower() == "auto":
    return detect_language(text)
  code = language.lower().replace("_", "-")
  return _LANGUAGES.get(code, _LANGUAGES.get(code.split("-")[0], code))


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


def utterance_rng(seed: int, uid: str) -> np.random.Generator:
  """The rng an utterance's voice is drawn from: a function of (seed, id) alone."""
  h = hashlib.sha256(f"{seed}\0{uid}".encode("utf-8")).digest()
  return np.random.default_rng([int.from_bytes(h[i:i + 4], "little") for i in range(0, 16, 4)])


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
  for marker in builders.MARKERS + (builders.AUDIO,):
    if marker in text:
      raise UtteranceError("bad_text", f"text contains the audio marker {marker!r}, which the builders reject")


def _given_id(item: dict[str, Any]) -> str:
  uid = item.get("id")
  return "" if uid is None else str(uid).strip()


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise SynthError(f"--format {fmt!r}: expected one of {FORMATS}")


def plan_text(path: str, fmt: str = "flac", language: str | None = None, limit: int | None = None) -> Plan:
  """The plan of an ASR sentence list: a text file (one sentence a line) or JSONL {"text", "id"?, "language"?}."""
  _check_format(fmt)
  raw = builders._read_text(path, "--text")  # the builders' reader: the same errors
  name = os.path.basename(path)
  if _is_jsonl(path, raw):
    rows = builders._json_rows(path, "--text file")  # the builders' reader: the same JSON is accepted
  else:
    rows = [builders.Row(i, f"{name}:{n}", {"text": line.strip()})
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
  _check_format(fmt)
  try:
    rows = builders._json_rows(path, "--instructions file")
  except builders.BuildError as e:
    raise SynthError(str(e)) from None
  plan = Plan("instructions", fmt)
  seen: set[str] = set()
  for row in rows[:limit]:
    item = row.data or {}
    cid = _given_id(item) or f"{row.index:07d}-{_digest(json.dumps(item, sort_keys=True))[:8]}"
    try:
      if row.error is not None:
        raise builders.Skip("bad_row", row.error)
      if "audio" in item or any(isinstance(t, dict) and "audio" in t for t in item.get("conversations") or []):
        raise builders.Skip("has_audio", "the conversation already holds audio; give text-only conversations")
      out, turns = dict(item), []
      out["id"] = cid
      conv = item.get("conversations")
      out["conversations"] = [dict(t) if isinstance(t, dict) else t for t in conv] if isinstance(conv, list) else conv
      for k, turn in enumerate(out["conversations"] if isinstance(conv, list) else []):
        if isinstance(turn, dict) and str(turn.get("from", "")).lower() in ("human", "user"):
          uid = f"{cid}_{k}"
          turn["audio"] = audio_path(uid, fmt)
          turns.append((uid, k, turn.get("value"), turn["audio"]))
      if any(isinstance(text, str) and builders.AUDIO in text for _, _, text, _ in turns):
        raise builders.Skip("has_audio", f"a human turn holds the {builders.AUDIO} placeholder; give text-only turns")
      # The instructions builder's own parser: what it rejects is not worth synthesizing.
      builders.parse_conversation(out, os.path.dirname(os.path.abspath(path)))
    except builders.Skip as s:
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


_ENGINE: dict[str, Any] = {}  # engine name -> instance or the SynthError that stopped it, per process


def _engine(name: str) -> Engine:
  if name not in _ENGINE:
    try:
      _ENGINE[name] = make_engine(name)
    except SynthError as e:
      _ENGINE[name] = e
  if isinstance(_ENGINE[name], SynthError):
    raise _ENGINE[name]
  return _ENGINE[name]


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
    audio = _engine(options.engine).synthesize(utt.text, utt.language, utterance_rng(options.seed, utt.id))
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


def _render_batch(utts: list[Utterance], out: str, options: Options) -> list[tuple[str, float, str, str]]:
  return [render(u, out, options) for u in utts]


def _render_all(jobs: list[Utterance], out: str, options: Options,
                workers: int) -> Iterator[tuple[str, float, str, str]]:
  """`render` over jobs, in this process (workers <= 0) or in `workers` spawned processes, in
  batches (IPC per utterance would cost as much as espeak itself) with a bounded number in flight."""
  if workers <= 0 or not jobs:
    for job in jobs:
      yield render(job, out, options)
    return
  size = max(1, min(16, len(jobs) // (8 * workers)))
  batches = iter([jobs[i:i + size] for i in range(0, len(jobs), size)])
  # spawn: the CLI process has imported JAX, whose threads do not survive fork().
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    pending = {pool.submit(_render_batch, b, out, options)
               for b in (next(batches, None) for _ in range(4 * workers)) if b}
    try:
      while pending:
        done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          yield from future.result()
          batch = next(batches, None)
          if batch:
            pending.add(pool.submit(_render_batch, batch, out, options))
    except BaseException:
      for future in pending:
        future.cancel()
      raise


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


def _say(msg: str, quiet: bool) -> None:
  if not quiet:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


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
    _say(f"fail {f.where} ({f.id}): {f.message} [{f.reason}]", quiet)
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
    for uid, secs, reason, message in _render_all(jobs, out, run_options, workers):
      bar.update()
      if reason:
        failures.append(Failure(uid, where[uid], reason, message))
        if len(failures) <= PRINT_FAILURES:
          _say(f"fail {where[uid]} ({uid}): {message} [{reason}]", quiet)
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
  _write_jsonl(manifest, rows)
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
      _say(f"conversation {f.where or f.id} dropped: {f.message} [{f.reason}]", quiet)
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
