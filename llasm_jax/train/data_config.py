"""The run config's `data` section -> the pipeline: what its batches carry, their PipelineConfig (the
loss policy filling `teacher` and `ctc`), and the training iterator."""

from __future__ import annotations

import os
from typing import Any

from llasm_jax.data.cache import check_cache, resolve_features
from llasm_jax.data.contract import PipelineConfig
from llasm_jax.data.features import MAX_FRAMES
from llasm_jax.data.pipeline import make_iterator
from llasm_jax.data.sources import Source
from llasm_jax.errors import UserError
from llasm_jax.models.llasm import LlasmConfig
from llasm_jax.train.losses import needs_ctc, needs_teacher


def data_features(config) -> tuple[str, dict[str, Any] | None]:
  """What the batches of `config.data` carry: ("mel", None) or ("cached", the cache marker)."""
  data = config.data
  if data.get("source", "tfds") != "tfds" or not data.get("dir"):
    if data.get("features", "auto") == "cached":
      raise UserError("config.data.features is 'cached' but config.data.source is not 'tfds'; cached features "
                       "come from a dataset of `llasm-jax data encode` (config.data.source=tfds, config.data.dir=DIR)")
    return "mel", None
  source = Source(data.dir)
  return resolve_features(data.get("features", "auto"), source), source.cache


def pipeline_config(config, cfg: LlasmConfig, features: str = "mel") -> PipelineConfig:
  """The PipelineConfig of `config.data` for the model `cfg` (with the teacher's sequences when
  config.train.loss distils)."""
  data = config.data
  buckets, feature_buckets = data.get("buckets"), data.get("feature_buckets")
  return PipelineConfig.from_model(
      cfg, seq_len=data.seq_len, max_audios=data.max_audios, mel_frames=data.get("mel_frames", MAX_FRAMES),
      buckets=tuple(buckets) if buckets else None, template=data.get("template", "llasm-cllama2"),
      system=data.get("system"), features=features, shared_prefix=bool(data.get("shared_prefix", False)),
      feature_buckets=tuple(feature_buckets) if feature_buckets else None, teacher=needs_teacher(config),
      ctc=needs_ctc(config),
      packing=bool(data.get("packing", False)), pack_window=int(data.get("pack_window", 128)))


def train_iterator(config, cfg: LlasmConfig, *, host_batch: int):
  """The iterator `llasm_jax/train` asks for: `config.data.dir` (comma-separated datasets) with
  `config.data.{seq_len, max_audios, mel_frames, seed}`, and optionally `tokenizer` (default:
  `config.train.init_from`, whose model folder holds the tokenizer), `template`
  ("llasm-cllama2"), `buckets` (default: none, every batch seq_len long: the same shape on every
  host), `features` ("auto": what the data holds, "mel" or "cached"), `feature_buckets`, `workers`
  (default min(8, CPUs); -1: none, the batches are made in this process) and `threads`."""
  data = config.data
  tokenizer = data.get("tokenizer") or config.get("train", {}).get("init_from")
  if not data.get("dir"):
    raise UserError("config.data.dir is empty; set it to the folder(s) `llasm-jax data build` wrote")
  if not tokenizer:
    raise UserError("no tokenizer: set config.data.tokenizer or config.train.init_from (a model folder)")
  source = Source(data.dir)
  pcfg = pipeline_config(config, cfg, resolve_features(data.get("features", "auto"), source))
  if pcfg.features == "cached":
    check_cache(source.cache, cfg, mel_frames=pcfg.mel_frames, where=f"config.data.dir {data.dir!r}")
  return make_iterator(source, pcfg, tokenizer, batch_size=host_batch, seed=data.get("seed", 0),
                       workers=data.get("workers") or min(8, os.cpu_count() or 1), threads=data.get("threads", 2))
