"""Recorded human speech with transcripts, from a registry source archive -> a held-out ASR manifest.

The registry ships little recorded speech with transcripts; pocketsphinx 5.1.1's source archive
holds some as test data (BSD-style CMU license; the LibriVox reading is public domain). It is
fetched, never built or installed, by the README's

  pip download --no-deps -r requirements/recordings.txt -d workdir/recordings

and read here as a tar file: no compiler, no network. Its clips, all 16 kHz mono 16-bit:

  librivox  5  one reader of LibriVox's "Sense and Sensibility", chapter 1 (`transcription`)
  cards     5  spoken playing cards, "eight of spades four of clubs ..." (`cards.transcription`)
  goforward 1  "go forward ten meters" (headerless PCM; the text pocketsphinx's own tests expect)
  forever   1  "feels like these days go on forever" (the text pocketsphinx's alignment test uses)

12 clips, 40.5 s; Whisper tiny.en hears them at 6.9% WER. `write_held_out(out_dir)` writes them
as OUT/audio/<id>.flac with OUT/manifest.jsonl ({"id", "audio", "text", "language", "source",
"speaker", "seconds"}; audio relative to OUT): what `data build asr --manifest` and
`builders.manifest_rows` read, as they read `data synth` manifests. Transcripts are lower case
without punctuation, as in the archive.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import tarfile
from typing import Iterator

import numpy as np

from llasm_jax.data.audio import SAMPLE_RATE, AudioError, check_audio, to_int16
from llasm_jax.data.jobs import write_jsonl
from llasm_jax.errors import UserError

ENV = "LLASM_RECORDINGS"  # a folder holding the archive, or the archive itself
FOLDER = os.path.join("workdir", "recordings")  # where the README's command puts it
DOWNLOAD = "pip download --no-deps -r requirements/recordings.txt -d workdir/recordings"
POCKETSPHINX = "pocketsphinx-5.1.1.tar.gz"
_DATA = "pocketsphinx-5.1.1/test/data/"
MANIFEST = "manifest.jsonl"
# The checkout holding this package (an editable install): the README's command ran there.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Clip:
  id: str
  member: str  # path inside the archive
  text: str
  speaker: str
  raw: bool = False  # headerless 16-bit little-endian PCM at 16 kHz


def find_recordings(path: str | os.PathLike | None = None) -> list[str]:
  """The archives that hold recorded speech: in `path` (a folder or the archive), else in
  $LLASM_RECORDINGS, else in workdir/recordings under the current folder or under the checkout.
  [] when none is found; a `path` or $LLASM_RECORDINGS without the archive is a UserError."""
  given = os.fspath(path) if path is not None else os.environ.get(ENV)
  if given:
    found = _archives(given)
    if not found:
      what = "path" if path is not None else f"${ENV}"
      raise UserError(f"recordings {what} {given!r} holds no {POCKETSPHINX}; fetch it with `{DOWNLOAD}` "
                      "and pass that folder")
    return found
  for folder in (FOLDER, os.path.join(_CHECKOUT, FOLDER)):
    found = _archives(folder)
    if found:
      return found
  return []


def _archives(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path] if os.path.basename(path) == POCKETSPHINX else []
  candidate = os.path.join(path, POCKETSPHINX)
  return [candidate] if os.path.isfile(candidate) else []


def _transcription(text: str) -> dict[str, str]:
  """Sphinx transcription lines "<s> words </s> (utterance id)" -> {id: words}."""
  out = {}
  for line in text.splitlines():
    m = re.fullmatch(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\((\S+)\)\s*", line)
    if m:
      out[m.group(2)] = " ".join(m.group(1).split())
  return out


def clips(archive: tarfile.TarFile) -> list[Clip]:
  """The clips of the pocketsphinx archive, their texts read from its transcription files."""
  def read(member: str) -> str:
    return archive.extractfile(_DATA + member).read().decode("utf-8")

  out = []
  for uid, text in _transcription(read("librivox/transcription")).items():
    out.append(Clip(f"librivox-{uid}", f"{_DATA}librivox/{uid}.wav", text, "librivox-sense-and-sensibility-01"))
  for uid, text in _transcription(read("cards/cards.transcription")).items():
    out.append(Clip(f"cards-{uid}", f"{_DATA}cards/{uid}.wav", text, "pocketsphinx-cards"))
  # These two have no transcription file: their texts are what pocketsphinx's tests assert
  # (cython/test/decoder_test.py, cython/test/alignment_test.py).
  out.append(Clip("goforward", f"{_DATA}goforward.raw", "go forward ten meters", "pocketsphinx-goforward", raw=True))
  out.append(Clip("forever-input_2", f"{_DATA}forever/input_2_16k.wav", "feels like these days go on forever",
                  "pocketsphinx-forever"))
  return out


def decode(archive: tarfile.TarFile, clip: Clip) -> np.ndarray:
  """float32[N] mono samples of `clip` at 16 kHz."""
  import soundfile as sf
  import soxr

  data = io.BytesIO(archive.extractfile(clip.member).read())
  if clip.raw:
    audio, rate = sf.read(data, dtype="float32", format="RAW", samplerate=SAMPLE_RATE, channels=1,
                          subtype="PCM_16", endian="LITTLE", always_2d=True)
  else:
    audio, rate = sf.read(data, dtype="float32", always_2d=True)
  audio = audio.mean(axis=1)
  if rate != SAMPLE_RATE:
    audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
  return np.ascontiguousarray(audio, np.float32)


def _open_all(recordings: str | os.PathLike | None) -> Iterator[tuple[str, tarfile.TarFile]]:
  """(path, open archive) of each archive `find_recordings` finds; none found is a UserError."""
  archives = find_recordings(recordings)
  if not archives:
    raise UserError(f"no recorded speech: {POCKETSPHINX} is not in {FOLDER} (here or in the checkout) and "
                    f"${ENV} is unset; fetch it with `{DOWNLOAD}`")
  for path in archives:
    try:
      yield path, tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError) as e:
      raise UserError(f"recordings archive {path!r} cannot be read ({e}); delete it and fetch it again with "
                      f"`{DOWNLOAD}`") from None


def transcripts(recordings: str | os.PathLike | None = None) -> list[str]:
  """What the recorded clips say, read without decoding them: the texts no training source may yield."""
  out = []
  for _, archive in _open_all(recordings):
    with archive:
      out += [clip.text for clip in clips(archive)]
  return out


def write_held_out(out_dir: str | os.PathLike, recordings: str | os.PathLike | None = None) -> str:
  """Writes the recorded clips and their manifest under `out_dir`; returns the manifest's path.
  `recordings`: where the archive is (see `find_recordings`)."""
  import soundfile as sf

  out_dir = os.fspath(out_dir)
  os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
  rows = []
  for path, archive in _open_all(recordings):
    with archive:
      for clip in clips(archive):
        audio = decode(archive, clip)
        try:
          check_audio(audio, clip.member)
        except AudioError as e:
          raise UserError(f"recordings archive {path!r}: {e}; delete it and fetch it again") from None
        rel = os.path.join("audio", f"{clip.id}.flac")
        sf.write(os.path.join(out_dir, rel), to_int16(audio), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append({"id": clip.id, "audio": rel, "text": clip.text, "language": "en",
                     "source": f"{os.path.basename(path)}:{clip.member}", "speaker": clip.speaker,
                     "seconds": round(len(audio) / SAMPLE_RATE, 3)})
  manifest = os.path.join(out_dir, MANIFEST)
  write_jsonl(manifest, rows, ensure_ascii=True)  # a manifest that exists is whole
  return manifest
