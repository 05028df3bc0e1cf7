"""Host batches -> global jax.Arrays over the mesh, and the padding that makes hosts' batches agree."""

from __future__ import annotations

import numpy as np

from llasm_jax.data.contract import BATCH_AXES, batch_keys
from llasm_jax.errors import UserError
from llasm_jax.tokens import IGNORE


def to_global(batch: dict[str, np.ndarray], mesh, rules, pad_id: int = 0, *, same_shape: bool = False) -> dict:
  """Host batch -> global jax.Arrays split over the mesh's batch axes (logical name "batch").

  With length buckets, hosts may pick different T for the same step; the hosts agree on the
  largest first (one tiny all-gather) and pad to it, since every host must pass the same shape.
  `same_shape=True` (fixed shapes, as the trainer's compiled step needs) skips that exchange.
  """
  import jax
  from jax.sharding import NamedSharding

  from llasm_jax import sharding

  cached, teacher = "audio_features" in batch, "teacher_input_ids" in batch
  if jax.process_count() > 1 and not same_shape:
    from jax.experimental import multihost_utils

    # T, K target slots, S of cached features and the teacher's Tt: every host pads to the largest.
    sizes = [batch["input_ids"].shape[1], batch["target_positions"].shape[1],
             batch["audio_features"].shape[2] if cached else 0, batch["teacher_input_ids"].shape[1] if teacher else 0]
    t, k, s, tt = np.max(multihost_utils.process_allgather(np.int32(sizes)).reshape(-1, 4), axis=0)
    batch = pad_length(batch, int(t), pad_id)
    if teacher:
      batch = pad_length(batch, int(tt), pad_id, prefix="teacher_")
    for name in ("target_positions", "teacher_target_positions") if teacher else ("target_positions",):
      slots = batch[name]
      if k > slots.shape[1]:
        batch = {**batch, name: np.pad(slots, ((0, 0), (0, int(k) - slots.shape[1])), constant_values=-1)}
    if cached:
      batch = pad_features(batch, int(s))
  out = {}
  if jax.process_count() > 1 and not same_shape and "ctc_labels" in batch:  # U: every host pads to the largest
    from jax.experimental import multihost_utils

    u = int(np.max(multihost_utils.process_allgather(np.int32(batch["ctc_labels"].shape[1]))))
    batch = {**batch, "ctc_labels": np.pad(batch["ctc_labels"], ((0, 0), (0, u - batch["ctc_labels"].shape[1])))}
  for name in batch_keys("cached" if cached else "mel", teacher, "prefix_ids" in batch, "segment_ids" in batch,
                         "ctc_labels" in batch):
    spec = sharding.logical_spec(BATCH_AXES[name], rules)
    out[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), batch[name])
  return out


def pad_features(batch: dict[str, np.ndarray], s: int) -> dict[str, np.ndarray]:
  """A cached batch's audio_features zero-padded to S = s frames."""
  cur = batch["audio_features"].shape[2]
  if s < cur:
    raise UserError(f"cannot pad cached features of {cur} frames to {s}")
  if s == cur:
    return batch
  return {**batch, "audio_features": np.pad(batch["audio_features"], ((0, 0), (0, 0), (0, s - cur), (0, 0)))}


def pad_length(batch: dict[str, np.ndarray], t: int, pad_id: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
  """The batch right-padded to T = t (masked positions: `pad_id`, labels -100); `prefix`
  "teacher_": the teacher's sequences to Tt = t instead."""
  cur = batch[prefix + "input_ids"].shape[1]
  if t < cur:
    raise UserError(f"cannot pad a batch of length {cur} to {t}")
  if t == cur:
    return batch
  widths = ((0, 0), (0, t - cur))
  out = dict(batch)
  out[prefix + "input_ids"] = np.pad(batch[prefix + "input_ids"], widths, constant_values=pad_id)
  if prefix + "labels" in batch:
    out[prefix + "labels"] = np.pad(batch[prefix + "labels"], widths, constant_values=IGNORE)
  out[prefix + "attention_mask"] = np.pad(batch[prefix + "attention_mask"], widths)
  # The padding's positions continue the row's columns (past a shared prefix): the real tokens'
  # positions stay, which in packed rows restart per sample.
  start = batch[prefix + "positions"][:, :1]
  tail = (start + np.arange(cur, t, dtype=np.int32)).astype(np.int32)
  out[prefix + "positions"] = np.concatenate([batch[prefix + "positions"], tail], axis=1)
  if not prefix and "segment_ids" in batch:
    out["segment_ids"] = np.pad(batch["segment_ids"], widths)
  return out
