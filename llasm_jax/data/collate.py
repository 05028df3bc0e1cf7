"""Collate: samples (as `featurize.Featurize` gives them, or packed rows) -> one host batch in the contract
(llasm_jax/data/contract.py)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llasm_jax.data.contract import PipelineConfig, target_positions, teacher_target_positions
from llasm_jax.tokens import IGNORE


class Collate:
  """Samples -> one host batch in the contract, padded to the length bucket of the longest. Packed
  rows (`packing.window_rows`) are samples that bring their own positions and segment_ids."""

  def __init__(self, cfg: PipelineConfig, pad_id: int):
    self.cfg, self.pad_id = cfg, pad_id

  def __call__(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    cfg = self.cfg
    b = len(samples)
    t = cfg.bucket(max(len(s["input_ids"]) for s in samples))
    start = len(samples[0]["prefix_ids"]) if cfg.shared_prefix else 0  # rows continue after the prefix
    out = {"input_ids": np.full((b, t), self.pad_id, np.int32), "labels": np.full((b, t), IGNORE, np.int32),
           "attention_mask": np.zeros((b, t), np.int32),
           "positions": np.broadcast_to(start + np.arange(t, dtype=np.int32), (b, t)).copy()}
    if cfg.shared_prefix:
      out["prefix_ids"] = samples[0]["prefix_ids"]
    packed = "segment_ids" in samples[0]
    if packed:
      out["segment_ids"] = np.zeros((b, t), np.int32)
    for i, s in enumerate(samples):
      n = len(s["input_ids"])
      out["input_ids"][i, :n] = s["input_ids"]
      out["labels"][i, :n] = s["labels"]
      out["attention_mask"][i, :n] = 1
      if packed:
        out["positions"][i, :n] = s["positions"]
        out["segment_ids"][i, :n] = s["segment_ids"]
    # With fixed shapes K = T (one compile); with buckets K follows the batch's longest answer.
    out["target_positions"] = target_positions(out["labels"], t if cfg.fixed_shapes else None)
    if cfg.teacher:
      out.update(self._teacher(samples, out["target_positions"]))
    if cfg.ctc:
      out.update(self._ctc(samples))
    if cfg.features == "cached":
      out.update(self._features(samples))
      return out
    out["mel"] = np.zeros((b, cfg.max_audios, cfg.num_mel_bins, cfg.frames), np.float32)
    out["mel_lengths"] = np.zeros((b, cfg.max_audios), np.int32)
    for i, s in enumerate(samples):
      a = len(s["mel_lengths"])
      out["mel"][i, :a] = s["mel"]
      out["mel_lengths"][i, :a] = s["mel_lengths"]
    return out

  def _teacher(self, samples: Sequence[dict[str, np.ndarray]], student_slots: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher's sequences [B, Tt] (Tt: the bucket of the longest) and its target slots
    [B, K], slot i of a row kept only where the student's slot i exists too (cuts differ)."""
    b = student_slots.shape[0]
    t = self.cfg.bucket(max(1, max(len(s["teacher_input_ids"]) for s in samples)))
    ids, labels = np.full((b, t), self.pad_id, np.int32), np.full((b, t), IGNORE, np.int32)
    mask = np.zeros((b, t), np.int32)
    for i, s in enumerate(samples):
      n = len(s["teacher_input_ids"])
      ids[i, :n], labels[i, :n], mask[i, :n] = s["teacher_input_ids"], s["teacher_labels"], 1
    slots = teacher_target_positions(labels, student_slots)
    return {"teacher_input_ids": ids, "teacher_attention_mask": mask,
            "teacher_positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "teacher_target_positions": slots}

  def _ctc(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """ctc_labels int32[B, U] (cut at U) and their full lengths int32[B]."""
    lengths = np.int32([len(s["ctc_labels"]) for s in samples])
    cap = self.cfg.ctc_width
    u = cap if self.cfg.fixed_shapes else min(cap, max(8, 1 << max(int(lengths.max(initial=0)) - 1, 0).bit_length()))
    labels = np.zeros((len(samples), u), np.int32)
    for i, s in enumerate(samples):
      n = min(u, len(s["ctc_labels"]))
      labels[i, :n] = s["ctc_labels"][:n]
    return {"ctc_labels": labels, "ctc_label_lengths": lengths}

  def _features(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Cached slots back to back per sample -> float[B, A, S, E] (S: the feature bucket)."""
    cfg = self.cfg
    longest = max((int(n) for s in samples for n in s["audio_feature_lengths"]), default=0)
    first = samples[0]["audio_features"]
    feats = np.zeros((len(samples), cfg.max_audios, cfg.feature_bucket(longest), first.shape[-1]), first.dtype)
    lengths = np.zeros((len(samples), cfg.max_audios), np.int32)
    for i, s in enumerate(samples):
      bounds = np.cumsum([0] + s["audio_feature_lengths"].tolist())
      for j, (a, z) in enumerate(zip(bounds[:-1], bounds[1:])):
        feats[i, j, :z - a] = s["audio_features"][a:z]
      lengths[i, :len(bounds) - 1] = s["audio_feature_lengths"]
    return {"audio_features": feats, "audio_feature_lengths": lengths}
