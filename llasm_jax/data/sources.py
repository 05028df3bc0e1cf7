"""Sources: random access to records as the builders store them (built datasets, or synthetic ones), and
what a record holds (its kind, its audios, its transcripts)."""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import numpy as np

from llasm_jax import paths
from llasm_jax.data import templates
from llasm_jax.data.audio import SAMPLE_RATE, from_int16
from llasm_jax.data.cache import features_identity
from llasm_jax.errors import UserError

MIXED = "mixed"  # a Source over asr and instructions datasets together
KIND_KEY = "_kind"  # a mixed Source's records: the kind of the dataset each came from
NO_TRANSCRIPTS = ("holds no `transcripts` (what each audio says), which the distillation teacher reads: it was "
                  "built before they were stored. Build it again with `llasm-jax data build instructions` (and "
                  "`data encode` it again if cached), or set config.train.loss='ce'")


def find_dataset(path: str) -> str:
  """The folder holding dataset_info.json: `path` itself, or DIR/<name>/<version> under it."""
  paths.require_local(path, "data dir", "datasets are read through the bucket mounted with gcsfuse, as grain "
                      "recommends (`launch/tpu.sh setup --data-bucket BUCKET` mounts it at /mnt/data): pass the "
                      "mounted folder")
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(glob.glob(os.path.join(path, "*", "dataset_info.json")) +
                 glob.glob(os.path.join(path, "*", "*", "dataset_info.json")))
  if len(found) != 1:
    what = "no dataset" if not found else f"{len(found)} datasets"
    raise FileNotFoundError(f"data dir {path!r}: {what} (dataset_info.json) found; pass the folder that "
                            "`llasm-jax data build` wrote (--out) or its <name>/<version> folder")
  return os.path.dirname(found[0])


class Source:
  """Random access over one or more built datasets: of one kind ("asr" or "instructions"), or of
  both ("mixed": stage 1 on transcripts and spoken instructions together; each record then
  carries its dataset's kind under KIND_KEY)."""

  def __init__(self, paths: str | Sequence[str]):
    import tensorflow_datasets as tfds

    if isinstance(paths, str):
      paths = [p for p in paths.split(",") if p]
    self.paths = [find_dataset(p) for p in paths]
    self.parts, self.part_kinds, caches = [], [], []
    for p in self.paths:
      builder = tfds.builder_from_directory(p)
      metadata = builder.info.metadata or {}
      self.part_kinds.append(metadata.get("kind"))
      caches.append(metadata.get("cache"))
      self.parts.append(builder.as_data_source("train"))
    kinds = set(self.part_kinds)
    if not kinds or not kinds <= {"asr", "instructions"}:
      raise UserError(f"datasets {self.paths}: unknown kinds {sorted(map(str, kinds))}; give datasets of "
                       "`llasm-jax data build` (asr or instructions) or `data encode`")
    self.kind = kinds.pop() if len(kinds) == 1 else MIXED
    # The `data encode` marker (what made the cached features), None for raw audio datasets.
    self.cache = caches[0]
    if any(features_identity(c) != features_identity(self.cache) for c in caches):
      raise UserError(f"datasets {self.paths}: some hold raw audio and some cached features, or features of "
                       "different Whisper models; encode every dataset with the same `llasm-jax data encode --ckpt`")
    self.offsets = np.cumsum([0] + [len(s) for s in self.parts])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    part = int(np.searchsorted(self.offsets, index, side="right")) - 1
    record = self.parts[part][int(index - self.offsets[part])]
    return {**record, KIND_KEY: self.part_kinds[part]} if self.kind == MIXED else record

  def __repr__(self):
    return f"Source({self.paths}, kind={self.kind!r}, len={len(self)})"


_WORDS = ("the weather model speech hello world one two three four five paris please what is this "
          "audio language helpful assistant tell me about a short story").split()


class SyntheticSource:
  """Deterministic records in the builders' format (speech-like audio, word-salad text), for
  tests and benchmarks. kind "asr": one clip each; "instructions": 1..max_turns spoken turns."""

  def __init__(self, kind: str = "asr", size: int = 64, seed: int = 0, seconds: tuple[float, float] = (1.0, 6.0),
               max_turns: int = 2):
    if kind not in ("asr", "instructions"):
      raise UserError(f"kind {kind!r}: expected 'asr' or 'instructions'")
    self.kind, self.size, self.seed, self.seconds, self.max_turns = kind, size, seed, seconds, max_turns

  def __len__(self) -> int:
    return self.size

  def _clip(self, rng) -> np.ndarray:
    n = int(rng.uniform(*self.seconds) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 100 + 80 * rng.random() + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = np.clip(np.sin(2 * np.pi * (3 + rng.random()) * t), 0, None) ** 2
    x = 0.3 * voiced * env + 0.01 * rng.standard_normal(n)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)

  def _text(self, rng) -> str:
    return " ".join(rng.choice(_WORDS, int(rng.integers(2, 10))))

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index) % self.size
    rng = np.random.default_rng([self.seed, index])
    if self.kind == "asr":
      return {"id": f"syn{index}".encode(), "audio": self._clip(rng), "text": self._text(rng).encode(),
              "language": b"en", "source": b"synthetic"}
    turns = int(rng.integers(1, self.max_turns + 1))
    clips = [self._clip(rng) for _ in range(turns)]
    values = []
    for _ in range(turns):
      values += [templates.AUDIO.encode(), self._text(rng).encode()]
    transcripts = [self._text(rng).encode() for _ in range(turns)]  # drawn last: the other fields stay as they were
    return {"id": f"syn{index}".encode(), "roles": np.tile(np.int32([0, 1]), turns), "values": values,
            "transcripts": transcripts, "audio": np.concatenate(clips), "audio_lengths": np.int32([len(c) for c in clips]),
            "language": b"en", "source": b"synthetic"}


def to_str(x) -> str:
  """A record's bytes field as text."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def record_kind(record: dict[str, Any], kind: str) -> str:
  """"asr" or "instructions": the record's own (from a mixed Source), else its source's `kind`."""
  return record.get(KIND_KEY, kind)


def record_audios(record: dict[str, Any], kind: str) -> list[np.ndarray]:
  """The audios of a built record ("asr": one; "instructions": one per `<audio>`), float32[N] each."""
  audio = from_int16(record["audio"])
  if record_kind(record, kind) == "asr":
    return [audio]
  bounds = np.cumsum([0] + [int(n) for n in record["audio_lengths"]])
  return [audio[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def check_transcripts(source, kind: str) -> None:
  """Raises if an instructions dataset of `source` predates the `transcripts` field (its first record)."""
  parts = list(zip(source.parts, source.part_kinds)) if kind == MIXED else [(source, kind)]
  for part, part_kind in parts:
    if part_kind == "instructions" and len(part) and "transcripts" not in part[0]:
      raise UserError(f"{source} {NO_TRANSCRIPTS}")
