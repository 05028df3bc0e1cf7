"""grain input pipeline: built datasets (or synthetic ones) -> host batches in the training contract.

The stages, one module each: sources (llasm_jax/data/sources.py) -> featurize (featurize.py) ->
collate (collate.py) or packing (packing.py) -> this iterator; the batch contract and its spec in
contract.py, cached features in cache.py, host -> global arrays in global_batch.py. The stages'
entry points (`PipelineConfig`, `Source`, `SyntheticSource`, `Featurize`, `Collate`) are named here too.

Order of the pipeline: source -> this host's shard -> seeded shuffle -> repeat -> per-sample
featurize + tokenize (seeded `random_map`: the stage-1 instruction and its side) -> batch with
static shapes -> threads -> worker processes (`mp_prefetch`). Batches are computed whole in
one worker and the workers are read round-robin, so the output does not depend on timing and
the iterator state (`get_state()` / `set_state()`, JSON-serializable) resumes exactly. With
`packing`, windows of samples are packed in the workers instead of batched, and their rows are
dealt into batches here (llasm_jax/data/packing.py); the state is then (window, row).

Samples that do not fit are cut, never dropped (so shapes, order and state stay simple): a
sequence longer than T is truncated at T, and audio beyond A slots, or whose marker span would
cross the cut, is removed together with the text from its `<au_start>` on. In "encoder" mode an
audio longer than one window (`mel_frames` frames, at most 30 s) takes one slot per window.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from llasm_jax.data import packing
from llasm_jax.data.cache import resolve_features
from llasm_jax.data.collate import Collate
from llasm_jax.data.contract import PipelineConfig
from llasm_jax.data.featurize import Featurize
from llasm_jax.data.sources import Source, SyntheticSource, check_transcripts
from llasm_jax.errors import UserError
from llasm_jax.tokens import load_tokenizer

__all__ = ["PipelineConfig", "Source", "SyntheticSource", "Featurize", "Collate", "batched_dataset", "pad_token",
           "BatchIterator", "make_iterator"]

log = logging.getLogger(__name__)


def batched_dataset(source, cfg: PipelineConfig, tokenizer, *, batch_size: int, seed: int = 0,
                    num_epochs: int | None = None, shard_index: int | None = None, shard_count: int | None = None,
                    drop_shard_remainder: bool = True):
  """A grain MapDataset whose element k is host batch k (the contract: llasm_jax/data/contract.py);
  with `cfg.packing`, window k of `cfg.pack_window` samples packed into rows (`packing.Pack`).

  source: a `Source`, a `SyntheticSource`, or a path (comma-separated paths) of built datasets.
  tokenizer: a tokenizer or its path (loaded in each worker). Sharding defaults to this JAX
  process among all; with `drop_shard_remainder` every shard has the same length (hosts run the
  same number of steps per epoch); False keeps every sample (disjoint shards whose union is all).
  num_epochs None repeats forever, reshuffled each epoch.
  """
  import grain

  if isinstance(source, str):
    source = Source(source)
  kind = getattr(source, "kind", "asr")
  resolve_features(cfg.features, source)  # raw audio for "mel", a cache for "cached"
  if shard_index is None or shard_count is None:
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=drop_shard_remainder)
    shard_index, shard_count = shard.shard_index, shard.shard_count
  if not 0 <= shard_index < shard_count:
    raise UserError(f"shard_index {shard_index} outside 0..{shard_count - 1}")
  if cfg.teacher:
    check_transcripts(source, kind)

  ds = grain.MapDataset.source(source)
  n = len(ds)
  if drop_shard_remainder:
    n -= n % shard_count
  ds = ds[shard_index:n:shard_count]
  if len(ds) < batch_size:
    raise UserError(f"shard {shard_index}/{shard_count} holds {len(ds)} samples, fewer than one batch of "
                     f"{batch_size}; use a smaller batch or a bigger dataset")
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.random_map(Featurize(cfg, tokenizer, kind), seed=seed + 1)
  if cfg.packing:  # a finite last window keeps its samples; PackedIterator drops a last partial batch
    return ds.batch(cfg.pack_window, drop_remainder=False, batch_fn=packing.Pack(cfg.seq_len, cfg.max_audios))
  return ds.batch(batch_size, drop_remainder=True, batch_fn=Collate(cfg, pad_token(cfg, tokenizer)))


def pad_token(cfg: PipelineConfig, tokenizer) -> int:
  """The id that pads rows: `cfg.pad_id`, else the tokenizer's pad, else its eos."""
  if cfg.pad_id is not None:
    return int(cfg.pad_id)
  tok = load_tokenizer(tokenizer)
  return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


class BatchIterator:
  """Host batches from worker processes, with a checkpointable position.

  Batch k is a pure function of (data, seed, shard, k), so the state is just k (plus what it
  was computed from, to catch a resume on other data): it is JSON-serializable and does not
  depend on the number of workers, so a job may resume on hosts with another CPU count.
  Call `close()` (or use `with`) to stop the workers.
  """

  fixed_shapes = True  # False: batches come in several shapes (length or feature buckets)

  def __init__(self, batches, *, workers: int = 0, threads: int = 2, worker_buffer: int = 2,
               fingerprint: dict[str, Any] | None = None):
    self.batches, self.workers, self.threads, self.worker_buffer = batches, workers, threads, worker_buffer
    self.fingerprint = fingerprint or {}
    self.step = 0
    self._it = None

  def _start(self):
    import grain

    ds = self.batches[self.step:].to_iter_dataset(
        grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=max(2, 2 * self.threads)))
    if self.workers > 0:
      from absl import flags

      # grain reads its absl flags in mp_prefetch; outside an absl app nobody parsed them.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                       per_worker_buffer_size=self.worker_buffer))
    self._it = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.step >= len(self.batches):
      raise StopIteration
    if self._it is None:
      self._start()
    batch = next(self._it)
    self.step += 1
    if self.workers > 0:
      # Worker output lives in shared memory that grain frees when the array dies; plain copies
      # (a few ms) keep its lifetime out of the caller's hands (no leaks at interpreter exit).
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, **self.fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    if "window" in state and "pack_window" not in self.fingerprint:
      raise UserError("the data iterator state was saved with config.data.packing; resume with "
                       "config.data.packing=True, or start a new workdir")
    changed = {k: (state.get(k), v) for k, v in self.fingerprint.items() if k in state and state[k] != v}
    if changed:
      log.warning("resuming the data iterator on other data or sharding (saved vs now: %s); batches from "
                  "here on differ from the interrupted run", changed)
    self.close()
    self.step = int(state["step"])

  def close(self) -> None:
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
      self._it = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown: nothing left to clean up with
      pass


def make_iterator(source, cfg: PipelineConfig, tokenizer, *, batch_size: int, seed: int = 0,
                  num_epochs: int | None = None, shard_index: int | None = None, shard_count: int | None = None,
                  drop_shard_remainder: bool = True, workers: int = 0, threads: int = 2,
                  worker_buffer: int = 2) -> BatchIterator | packing.PackedIterator:
  """`batched_dataset(...)` read by `workers` processes (0: this process) of `threads` threads;
  with `cfg.packing` its windows, dealt into batches of `batch_size` rows by a `PackedIterator`."""
  if isinstance(source, str):
    source = Source(source)
  batches = batched_dataset(source, cfg, tokenizer, batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                            shard_index=shard_index, shard_count=shard_count,
                            drop_shard_remainder=drop_shard_remainder)
  import grain

  if shard_index is None or shard_count is None:
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=drop_shard_remainder)
    shard_index, shard_count = shard.shard_index, shard.shard_count
  fingerprint = {"seed": seed, "shard": [shard_index, shard_count], "samples": len(source),
                 "batch_size": batch_size, "seq_len": cfg.seq_len, "mode": cfg.mode, "features": cfg.features,
                 "teacher": cfg.teacher}
  if cfg.packing:
    fingerprint["pack_window"] = cfg.pack_window
  it = BatchIterator(batches, workers=workers, threads=threads, worker_buffer=worker_buffer,
                     fingerprint=fingerprint)
  if cfg.packing:
    it = packing.PackedIterator(it, Collate(cfg, pad_token(cfg, tokenizer)), batch_size)
  it.fixed_shapes = cfg.fixed_shapes  # the trainer pads across hosts and compiles per shape otherwise
  return it
