"""Sequence packing for training: several samples per row, each attending to itself only.

Legend: W samples per packing window, R packed rows of a window, N their tokens, T seq_len,
A audio slots per row (max_audios), M mel bins, F mel frames, E Whisper width.

Windows of W consecutive samples of the (shuffled, repeated, featurized) sample stream are
packed first-fit decreasing: the samples, longest first, each go into the first row of the
window where both their tokens fit in T and their audio slots fit in A, else open a row. So A is
a per-row budget shared by the row's samples. Inside a row the samples keep their stream order,
numbered by `segment_ids` 1..n (0 = padding), their positions restarting at 0 (at P after a
shared prefix), their audio slots back to back in the same order as their `<au_start>` markers:
`Llasm` takes the j-th audio of a row for its j-th marker span, so each audio stays with its sample.

A window is one grain element, computed whole in one worker (`Pack`); `PackedIterator` deals
its rows into host batches in this process. Window k is a pure function of (data, seed, shard,
k), so the iterator state is (window, row within it): JSON, exact on resume, and independent of
the number of workers, as for unpacked batches.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from llasm_jax.tokens import IGNORE
from llasm_jax.errors import UserError

AUDIO_LENGTHS = ("mel_lengths", "audio_feature_lengths")  # a sample's slot lengths: mel or cached features


def first_fit_decreasing(lengths: Sequence[int], slots: Sequence[int], seq_len: int,
                         max_audios: int) -> list[list[int]]:
  """Sample indices per row: longest first, each into the first row whose tokens (<= seq_len) and
  audio slots (<= max_audios) both still fit it, else into a new row. Each row lists its samples in
  index order. Every sample must fit an empty row (the pipeline cuts samples to these limits)."""
  rows: list[list[int]] = []
  used: list[list[int]] = []  # [tokens, slots] per row
  for i in sorted(range(len(lengths)), key=lambda i: -int(lengths[i])):  # stable: ties keep stream order
    n, a = int(lengths[i]), int(slots[i])
    if n > seq_len or a > max_audios:
      raise UserError(f"sample of {n} tokens and {a} audio slots does not fit a row of {seq_len} tokens and "
                       f"{max_audios} slots")
    for row, u in zip(rows, used):
      if u[0] + n <= seq_len and u[1] + a <= max_audios:
        row.append(i)
        u[0] += n
        u[1] += a
        break
    else:
      rows.append([i])
      used.append([n, a])
  return [sorted(r) for r in rows]


class Pack:
  """The samples of one window (as `pipeline.Featurize` gives them) -> their packed rows, flat:
  input_ids, labels, positions, segment_ids int32[N] (rows back to back), row_lengths int32[R],
  row_slots int32[R], the slots' audio back to back (mel float32[slots, M, F] + mel_lengths, or
  audio_features [frames, E] + audio_feature_lengths), and prefix_ids with a shared prefix.
  Flat arrays travel from grain's workers in shared memory; `window_rows` cuts them into rows."""

  def __init__(self, seq_len: int, max_audios: int):
    self.seq_len, self.max_audios = seq_len, max_audios

  def __call__(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    lengths_key = next(k for k in AUDIO_LENGTHS if k in samples[0])
    lengths = [len(s["input_ids"]) for s in samples]
    slots = [len(s[lengths_key]) for s in samples]
    rows = first_fit_decreasing(lengths, slots, self.seq_len, self.max_audios)
    order = [i for row in rows for i in row]
    start = len(samples[0]["prefix_ids"]) if "prefix_ids" in samples[0] else 0  # rows continue after it
    labels = []
    for i in order:
      # A sample's first token is never a target alone in a row (nothing precedes it); packed, it
      # must not become one, predicted from the sample before it.
      own = samples[i]["labels"].copy()
      own[:1] = IGNORE
      labels.append(own)
    out = {"input_ids": np.concatenate([samples[i]["input_ids"] for i in order]).astype(np.int32),
           "labels": np.concatenate(labels).astype(np.int32),
           "positions": np.concatenate([start + np.arange(lengths[i], dtype=np.int32) for i in order]),
           "segment_ids": np.concatenate([np.full(lengths[i], k + 1, np.int32) for row in rows
                                          for k, i in enumerate(row)]),
           "row_lengths": np.int32([sum(lengths[i] for i in row) for row in rows]),
           "row_slots": np.int32([sum(slots[i] for i in row) for row in rows]),
           lengths_key: np.concatenate([samples[i][lengths_key] for i in order]).astype(np.int32)}
    audio_key = "mel" if lengths_key == "mel_lengths" else "audio_features"
    out[audio_key] = np.concatenate([samples[i][audio_key] for i in order])
    if "prefix_ids" in samples[0]:
      out["prefix_ids"] = samples[0]["prefix_ids"]
    return out


def window_rows(window: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """A `Pack` output -> its rows, each shaped like one sample (plus positions, segment_ids), in order."""
  tokens = np.cumsum(np.concatenate([[0], window["row_lengths"]]))
  slots = np.cumsum(np.concatenate([[0], window["row_slots"]]))
  cached = "audio_features" in window
  lengths_key = "audio_feature_lengths" if cached else "mel_lengths"
  # Slot j's audio: mel[j], or (cached: unpadded frames back to back) the frames after those of slots < j.
  frames = np.cumsum(np.concatenate([[0], window[lengths_key]])) if cached else np.arange(len(window[lengths_key]) + 1)
  rows = []
  for r in range(len(window["row_lengths"])):
    a, z = tokens[r], tokens[r + 1]
    row = {k: window[k][a:z] for k in ("input_ids", "labels", "positions", "segment_ids")}
    row[lengths_key] = window[lengths_key][slots[r]:slots[r + 1]]
    audio_key = "audio_features" if cached else "mel"
    row[audio_key] = window[audio_key][frames[slots[r]]:frames[slots[r + 1]]]
    if "prefix_ids" in window:
      row["prefix_ids"] = window["prefix_ids"]
    rows.append(row)
  return rows


class PackedIterator:
  """Host batches of `batch_size` packed rows, dealt in order from the windows of `windows` (an
  iterator of `Pack` outputs with get_state/set_state/close, e.g. `pipeline.BatchIterator`) and
  made into batches by `collate` (`pipeline.Collate`). A batch may take rows of several windows.

  State: {"step": batches so far, "window": the window of the next row, "row": its index there}
  plus the window iterator's fingerprint. A resume recomputes that window and skips its first rows.
  """

  fixed_shapes = True  # False: batches come in several shapes (length or feature buckets)

  def __init__(self, windows, collate: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]],
               batch_size: int):
    self.windows, self.collate, self.batch_size = windows, collate, batch_size
    self.step = 0
    self.window, self.row = 0, 0  # the position of the next row
    self._rows: list[dict[str, np.ndarray]] | None = None  # the rows of window `self.window`, once read

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    while len(rows) < self.batch_size:
      if self._rows is None:
        self._rows = window_rows(next(self.windows))  # StopIteration ends the data (finite epochs)
      if self.row < len(self._rows):
        rows.append(self._rows[self.row])
        self.row += 1
      else:
        self._rows, self.window, self.row = None, self.window + 1, 0
    self.step += 1
    return self.collate(rows)

  def get_state(self) -> dict[str, Any]:
    return {**self.windows.get_state(), "step": self.step, "window": self.window, "row": self.row}

  def set_state(self, state: dict[str, Any]) -> None:
    if "window" not in state:
      raise UserError("the data iterator state was saved without config.data.packing; resume with "
                       "config.data.packing=False, or start a new workdir")
    window_state = {k: v for k, v in state.items() if k not in ("window", "row")}
    self.windows.set_state({**window_state, "step": int(state["window"])})
    self.step, self.window, self.row = int(state["step"]), int(state["window"]), int(state["row"])
    self._rows = None

  def close(self) -> None:
    self.windows.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
