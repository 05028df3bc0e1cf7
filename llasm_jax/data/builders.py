"""TFDS datasets (ArrayRecord) built from local files: ASR corpora and spoken-instruction conversations.

Built by `llasm-jax data build asr|instructions ... --out DIR` into DIR/<name>/<version>/, with
DIR/<name>/build_report.json listing every skipped row with its reason. No downloads.

Storage: decoded 16 kHz mono audio as int16 (raw bytes), not features. Whisper reads int16
at 16 kHz itself, so nothing is lost; it is half the size of float32 80-bin features (32 KB/s
against 32 KB/s x M/80 for float32 mel, before the 30 s padding of "llasm" mode, which would
make a 5 s clip 6x larger still), it serves both modes and any mel size, and the numpy
log-mel costs ~1.5 ms per 5 s clip on one core (bench/data_speed.py), far below what a
training step consumes per host. Text is stored raw and tokenized in the input pipeline, so
one dataset serves every template and tokenizer.

Sources:
- ASR (`llasm_asr`): a JSONL manifest of {"audio": path, "text": str, "language": "en"|"zh"}
  (paths relative to the manifest's folder or --audio-root; optional "id"), the LibriSpeech
  layout (`*/*/*.trans.txt` next to the .flac files; text lower-cased, as LibriSpeech is
  all capitals), or the AISHELL layout (`transcript/*.txt` lines "UTTID w1 w2 ...", with
  `wav/**/UTTID.wav`; the word spaces of the Chinese text are removed).
- Instructions (`llasm_instructions`): LLaSM-Audio-Instructions-style conversations with spoken
  human turns, in the shape `rows.parse_conversation` accepts (see `rows`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import io
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np

from llasm_jax import paths, tokens
from llasm_jax.data.audio import SAMPLE_RATE, AudioError, check_audio, load_audio, to_int16
from llasm_jax.data.jobs import ordered_map, say
from llasm_jax.data.rows import BuildError, Row, Skip, json_rows, parse_conversation, read_text, resolve
from llasm_jax.errors import UserError
from llasm_jax.tokens import AUDIO, MARKERS

VERSION = "1.0.0"
REPORT = "build_report.json"


@dataclasses.dataclass(frozen=True)
class Options:
  """What a kept row must satisfy."""

  min_seconds: float = 0.1
  max_seconds: float | None = 30.0  # per audio; 30 s is what "llasm" mode sees (it trims the rest)
  silence_peak: float = 1e-4
  max_text_chars: int = 4000  # all text of a row
  max_text_tokens: int | None = None  # with `tokenizer`: text tokens of a row (audio tokens come on top)
  tokenizer: str | None = None  # a path for AutoTokenizer.from_pretrained

  def __post_init__(self):
    if self.max_text_tokens and not self.tokenizer:
      raise UserError("--max-text-tokens needs --tokenizer (a tokenizer folder or hub name) to count tokens")


# ---------------------------------------------------------------------------------------------
# Reading the sources (cheap, in the main process): rows with paths and text, no audio yet.


def manifest_rows(manifest: str, audio_root: str | None = None, language: str = "en") -> list[Row]:
  """ASR rows of a JSONL manifest {"audio", "text", "language"}."""
  root = audio_root or os.path.dirname(os.path.abspath(manifest))
  rows = json_rows(manifest, "manifest")
  for row in rows:
    if row.data is None:
      continue
    item = row.data
    missing = [k for k in ("audio", "text") if not isinstance(item.get(k), str)]
    if missing:
      row.error, row.data = f"field {missing[0]!r} missing or not a string", None
      continue
    lang = item.get("language", language)
    row.data = {"id": str(item.get("id", os.path.splitext(os.path.basename(item["audio"]))[0])),
                "audio": resolve(item["audio"], root), "text": item["text"],
                "language": lang if isinstance(lang, str) else language}
  return rows


def librispeech_rows(root: str) -> list[Row]:
  """ASR rows of the LibriSpeech layout: SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt + UTT.flac."""
  files = sorted(glob.glob(os.path.join(root, "**", "*.trans.txt"), recursive=True))
  if not files:
    raise BuildError(f"--librispeech {root!r}: no */*/*.trans.txt files; point it at a LibriSpeech split "
                     "folder (e.g. LibriSpeech/train-clean-100) or its parent")
  rows = []
  for f in files:
    folder = os.path.dirname(f)
    for lineno, line in enumerate(read_text(f, "transcript").splitlines(), 1):
      if not line.strip():
        continue
      where = f"{os.path.relpath(f, root)}:{lineno}"
      utt, _, text = line.strip().partition(" ")
      if not text:
        rows.append(Row(len(rows), where, error="no transcript after the utterance id"))
        continue
      rows.append(Row(len(rows), where, {"id": utt, "audio": os.path.join(folder, utt + ".flac"),
                                          "text": text.lower(), "language": "en"}))
  return rows


_CJK_SPACE = re.compile(r"(?<=[^\x00-\x7f])\s+(?=[^\x00-\x7f])")


def aishell_rows(root: str) -> list[Row]:
  """ASR rows of the AISHELL layout: transcript/*.txt ("UTTID 词 词 ...") + wav/**/UTTID.wav."""
  transcripts = sorted(glob.glob(os.path.join(root, "**", "transcript", "*.txt"), recursive=True))
  if not transcripts:
    raise BuildError(f"--aishell {root!r}: no transcript/*.txt; point it at data_aishell (the folder "
                     "holding transcript/ and wav/)")
  wavs = {}
  for w in glob.glob(os.path.join(root, "**", "*.wav"), recursive=True):
    wavs.setdefault(os.path.splitext(os.path.basename(w))[0], w)
  rows = []
  for f in transcripts:
    for lineno, line in enumerate(read_text(f, "transcript").splitlines(), 1):
      if not line.strip():
        continue
      where = f"{os.path.relpath(f, root)}:{lineno}"
      utt, _, text = line.strip().partition(" ")
      if not text.strip():
        rows.append(Row(len(rows), where, error="no transcript after the utterance id"))
        continue
      path = wavs.get(utt, os.path.join(root, "wav", utt + ".wav"))  # a missing one is reported by name
      rows.append(Row(len(rows), where, {"id": utt, "audio": path, "text": _CJK_SPACE.sub("", text.strip()),
                                          "language": "zh"}))
  return rows


def asr_rows(manifest: str | None = None, librispeech: str | None = None, aishell: str | None = None,
             audio_root: str | None = None, language: str = "en") -> list[Row]:
  """The rows of every given ASR source, one numbering."""
  if not (manifest or librispeech or aishell):
    raise BuildError("no ASR source: pass --manifest FILE, --librispeech DIR and/or --aishell DIR")
  rows = []
  if manifest:
    rows += manifest_rows(manifest, audio_root, language)
  if librispeech:
    rows += librispeech_rows(librispeech)
  if aishell:
    rows += aishell_rows(aishell)
  for i, row in enumerate(rows):
    row.index = i
  return rows


def instruction_rows(json_path: str, audio_root: str | None = None) -> list[Row]:
  root = audio_root or os.path.dirname(os.path.abspath(json_path))
  rows = json_rows(json_path, "instructions file")
  for row in rows:
    if row.data is not None:
      row.data = {"item": row.data, "root": root}
  return rows


# ---------------------------------------------------------------------------------------------
# Turning rows into examples (in worker processes: decoding dominates).

def _count_tokens(texts: list[str], opts: Options) -> int:
  tok = tokens.load_tokenizer(opts.tokenizer)
  return sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)


def _check_texts(texts: list[str], opts: Options) -> None:
  chars = sum(len(t) for t in texts)
  if chars > opts.max_text_chars:
    raise Skip("text_too_long", f"{chars} characters of text, more than --max-text-chars {opts.max_text_chars}")
  if opts.max_text_tokens is not None and opts.tokenizer:
    n = _count_tokens(texts, opts)
    if n > opts.max_text_tokens:
      raise Skip("text_too_long", f"{n} text tokens, more than --max-text-tokens {opts.max_text_tokens}")


def _audio(path: str, opts: Options) -> np.ndarray:
  try:
    audio = load_audio(path)
    check_audio(audio, path, min_seconds=opts.min_seconds, max_seconds=opts.max_seconds,
                silence_peak=opts.silence_peak)
  except AudioError as e:
    raise Skip(e.reason, str(e), path) from None
  return to_int16(audio)


def asr_example(row: Row, opts: Options) -> dict[str, Any]:
  d = row.data
  text = d["text"].strip()
  if not text:
    raise Skip("empty_text", "empty transcript", d["audio"])
  for m in MARKERS + (AUDIO,):
    if m in text:
      raise Skip("bad_text", f"transcript contains the marker {m!r}", d["audio"])
  _check_texts([text], opts)
  audio = _audio(d["audio"], opts)
  return {"id": d["id"], "audio": audio, "text": text, "language": d["language"], "source": d["audio"]}


def instruction_example(row: Row, opts: Options) -> dict[str, Any]:
  conv = parse_conversation(row.data["item"], row.data["root"])
  _check_texts([v.replace(AUDIO, "") for v in conv["values"]], opts)
  audios = [_audio(p, opts) for p in conv["audio_paths"]]
  return {"id": conv["id"] or row.where, "roles": np.asarray(conv["roles"], np.int32), "values": conv["values"],
          "transcripts": conv["transcripts"], "audio": np.concatenate(audios), "audio_lengths": np.asarray([len(a) for a in audios], np.int32),
          "language": conv["language"], "source": ";".join(conv["audio_paths"])}


def _process(fn: Callable[[Row, Options], dict], row: Row, opts: Options) -> tuple[Row, dict | None, Skip | None]:
  if row.error is not None:
    return row, None, Skip("bad_row", row.error)
  try:
    return row, fn(row, opts), None
  except Skip as s:
    return row, None, s
  except Exception as e:  # one odd file must not end a build of a million rows; it is reported
    return row, None, Skip("error", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# The TFDS builders.


def _builders():
  """The builder classes, defined on first use: importing TFDS is slow and registers names."""
  global _BUILDERS
  if _BUILDERS is not None:
    return _BUILDERS
  import tensorflow_datasets as tfds

  bytes_enc = tfds.features.Encoding.BYTES  # raw little-endian bytes: ~5x faster to read than int lists

  class _Base(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      # No checksums or URLs to look up next to the code; TFDS's lookup of the module's
      # resources also needs `importlib_resources`, which it does not install.
      return None

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for row, example in self.llasm_examples:
        yield row.index, example

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=self.llasm_description,
                                   features=tfds.features.FeaturesDict(self.llasm_features()),
                                   metadata=tfds.core.MetadataDict(kind=self.llasm_kind, sample_rate=SAMPLE_RATE))

  text = tfds.features.Text
  int16s = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding=bytes_enc)
  int32s = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)

  class LlasmAsr(_Base, skip_registration=True):
    """(audio, transcript, language) rows for stage-1 training."""

    name, llasm_kind = "llasm_asr", "asr"
    llasm_description = "16 kHz mono int16 speech with transcripts (llasm_jax ASR dataset)"

    def llasm_features(self):
      return {"id": text(), "audio": int16s(), "text": text(), "language": text(), "source": text()}

  class LlasmInstructions(_Base, skip_registration=True):
    """Conversations with spoken human turns for stage-2 training."""

    name, llasm_kind = "llasm_instructions", "instructions"
    llasm_description = "Conversations with 16 kHz mono int16 audio (llasm_jax instructions dataset)"

    def llasm_features(self):
      return {"id": text(), "roles": int32s(), "values": tfds.features.Sequence(text()),
              "transcripts": tfds.features.Sequence(text()),  # per audio; "" = unknown
              "audio": int16s(), "audio_lengths": int32s(), "language": text(), "source": text()}

  _BUILDERS = {"asr": LlasmAsr, "instructions": LlasmInstructions}
  return _BUILDERS


_BUILDERS = None


@dataclasses.dataclass
class BuildResult:
  path: str  # the dataset folder (DIR/<name>/<version>)
  report_path: str
  report: dict[str, Any]


def staged_dataset(out: str, name: str, report: str, overwrite: bool, write: Callable[[str], Any]):
  """Runs `write(local_out)`, which writes the dataset `name` into a local folder, and uploads it
  to the bucket `out`: TFDS's ArrayRecord writer writes local files only. Its dataset_info.json
  goes up last, so readers see the dataset complete or not at all; an old one there loses its
  dataset_info.json first. Returns write's result with its paths pointing into the bucket."""
  home = paths.resolve(out) / name
  remote = home / VERSION
  if remote.exists() and not overwrite:
    raise FileExistsError(f"dataset {os.fspath(remote)!r} exists; pass --overwrite or choose another --out")
  with tempfile.TemporaryDirectory(prefix="llasm_jax_dataset_") as local:
    result = write(local)
    local_home = os.path.join(local, name)
    result.report["path"] = os.fspath(remote)
    paths.write_json(os.path.join(local_home, report), result.report, ensure_ascii=False, indent=1)
    if remote.exists():
      (remote / "dataset_info.json").unlink(missing_ok=True)
      remote.rmtree()
    paths.upload_tree(local_home, home, last=(f"{VERSION}/dataset_info.json",))
  return dataclasses.replace(result, path=os.fspath(remote), report_path=os.fspath(home / report))


def build(kind: str, rows: list[Row], out: str, *, options: Options = Options(), workers: int = 0,
          max_skip_share: float = 0.5, overwrite: bool = False, quiet: bool = False,
          print_skips: int = 50) -> BuildResult:
  """Builds the `kind` ("asr" or "instructions") dataset of `rows` into `out`/<name>/<version>;
  `out` may be a bucket (gs://...), written through a local staging folder (`staged_dataset`).

  Bad rows are skipped, printed (the first `print_skips`) and listed in the report; the build
  fails with BuildError if more than `max_skip_share` of the rows are skipped.
  """
  if paths.is_remote(out):
    return staged_dataset(out, _builders()[kind].name, REPORT, overwrite, lambda local: build(
        kind, rows, local, options=options, workers=workers, max_skip_share=max_skip_share, quiet=quiet,
        print_skips=print_skips))
  import tensorflow_datasets as tfds
  from tqdm import tqdm

  if kind not in ("asr", "instructions"):
    raise UserError(f"kind {kind!r}: expected 'asr' or 'instructions'")
  if not 0.0 <= max_skip_share <= 1.0:
    raise UserError(f"--max-skip-share {max_skip_share}: expected a fraction between 0 and 1")
  cls = _builders()[kind]
  home = os.path.join(out, cls.name)
  path = os.path.join(home, VERSION)
  if os.path.exists(path):
    if not overwrite:
      raise FileExistsError(f"dataset {path!r} exists; pass --overwrite or choose another --out")
    shutil.rmtree(path)
  os.makedirs(home, exist_ok=True)
  report_path = os.path.join(home, REPORT)
  fn = asr_example if kind == "asr" else instruction_example
  skipped: collections.Counter = collections.Counter()
  skipped_rows: list[dict[str, Any]] = []
  kept, seconds = 0, 0.0
  allowed = int(max_skip_share * len(rows))
  t0 = time.time()

  def examples():
    nonlocal kept, seconds
    bar = tqdm(total=len(rows), desc=f"building {cls.name}", unit="row", disable=quiet, dynamic_ncols=True)
    try:
      for row, example, skip in ordered_map(functools.partial(_process, fn, opts=options), rows, workers):
        bar.update()
        if skip is not None:
          skipped[skip.reason] += 1
          file = skip.file or (row.data or {}).get("audio", "")
          skipped_rows.append({"row": row.index, "where": row.where, "file": file, "reason": skip.reason,
                               "message": skip.message})
          if len(skipped_rows) <= print_skips:
            say(f"skip {row.where}: {skip.message} [{skip.reason}]", quiet)
          if sum(skipped.values()) > allowed:
            raise BuildError(f"{sum(skipped.values())} of {len(rows)} rows failed, more than --max-skip-share "
                             f"{max_skip_share:g}; the source looks wrong (see {report_path})")
          continue
        kept += 1
        seconds += len(example["audio"]) / SAMPLE_RATE
        bar.set_postfix(kept=kept, skipped=sum(skipped.values()), refresh=False)
        yield row, example
    finally:
      bar.close()

  def write_report(status: str, error: str = "") -> dict[str, Any]:
    report = {"dataset": cls.name, "path": path, "status": status, "error": error, "rows_read": len(rows),
              "kept": kept, "skipped": dict(sorted(skipped.items())), "audio_hours": round(seconds / 3600, 4),
              "elapsed_s": round(time.time() - t0, 2), "options": dataclasses.asdict(options),
              "max_skip_share": max_skip_share, "skipped_rows": skipped_rows}
    if status == "ok":
      report["bytes"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    paths.write_json(report_path, report, ensure_ascii=False, indent=1)
    return report

  if not rows:
    write_report("failed", "no rows")
    raise BuildError("the source holds no rows; check the manifest / folder")
  tfds.disable_progress_bar()  # one bar, ours
  builder = cls(data_dir=out, file_format="array_record")
  builder.llasm_examples = examples()
  try:
    # TFDS prints "Downloading and preparing": nothing is downloaded, so keep stdout for the summary.
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_dir=scratch,
                                   download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except BuildError as e:
    write_report("failed", str(e))
    raise
  except Exception as e:
    # TFDS wraps generator errors; surface ours with its message.
    cause = e
    while cause is not None and not isinstance(cause, BuildError):
      cause = cause.__cause__ or cause.__context__
    if isinstance(cause, BuildError):
      write_report("failed", str(cause))
      raise cause from None
    write_report("failed", f"{type(e).__name__}: {e}")
    raise
  if kept == 0:
    shutil.rmtree(path, ignore_errors=True)
    write_report("failed", "no row was kept")
    raise BuildError(f"no row was kept; see {report_path}")
  return BuildResult(path, report_path, write_report("ok"))


def summary(result: BuildResult) -> str:
  """The lines printed at the end of a build."""
  r = result.report
  reasons = ", ".join(f"{k} {v}" for k, v in r["skipped"].items()) or "none"
  size = r["bytes"]
  return (f"rows read {r['rows_read']}, kept {r['kept']}, skipped {r['rows_read'] - r['kept']} ({reasons})\n"
          f"dataset {result.path}: {r['audio_hours']:.3f} h of audio, {size / 2**20:.1f} MiB, "
          f"{r['elapsed_s']:.1f} s\nreport {result.report_path}")
