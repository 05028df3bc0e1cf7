"""`llasm-jax data encode`: the frozen Whisper run once over a built dataset, its outputs stored for training.

Legend: N slots in a batch, M mel bins, F mel frames (a frame bucket), S feature frames, E Whisper width.

Whisper is frozen in both training stages, so what the adaptor reads (`Llasm.encode_audio`: the
decoder states over the 64 queries in "llasm" mode, the unpadded encoder frames in "encoder"
mode) is computed once here, and training reads it instead of audio (the pipeline's
`features="cached"`): no mel, no Whisper in the step.

Output: OUT/llasm_<kind>_features/<version>/, a TFDS ArrayRecord dataset with the source rows'
text fields (id, text | roles + values, language, source) and, per row, for its slots (the
pipeline's `audio_slots`: one per audio in "llasm" mode, one per `mel_frames` window in
"encoder" mode, so cached and uncached training see the same slots):
  features         float32|bfloat16[sum_j S_j, E]  the slots' features back to back, valid frames only
                   (S_j = audio_token_len in "llasm" mode, ceil(F_j / 2) in "encoder" mode)
  feature_lengths  int32[n]          S_j
  mel_lengths      int32[n]          F_j: the audio tokens of slot j are `audio_tokens(F_j)`, as uncached
  slots            int32[n_audios]   windows per audio
The metadata holds `kind` and `cache`, the marker of what made the features (`cache.cache_marker`:
mode, Whisper sizes and weights fingerprint, mel bins, window, dtype); training refuses a cache
whose marker disagrees with its own model. Sizes: "encoder" mode stores 50 frames/s x E values,
in bfloat16 38 KB per second of audio for Whisper tiny (E = 384), 128 KB/s for large (E = 1280),
against 32 KB/s for the int16 audio; "llasm" mode stores 64 x E values per audio.

Batching: the slots of a chunk of rows are sorted by length and cut into batches of
`batch_size`, each padded to its frame bucket (eighths of a window), so a 3 s clip pays for
3.75 s of Whisper, not 30 s; the encoder masks the padding (valid frames equal an unpadded
run). Several hosts: each process encodes a contiguous share of the rows on its own devices (the
mesh spans this process's devices, so no process waits for another's buckets) into shard file i
of n; process 0 writes the metadata when all are done. The folder is written under a temporary
name and renamed at the end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from llasm_jax import checkpoint, paths, sharding
from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.data import cache, contract, featurize, pipeline, sources
from llasm_jax.data.audio import SAMPLE_RATE
from llasm_jax.data import builders
from llasm_jax.data.builders import VERSION
from llasm_jax.data.features import MAX_FRAMES
from llasm_jax.models.llasm import Llasm, LlasmConfig
from llasm_jax.errors import UserError

DTYPES = ("bfloat16", "float32")
REPORT = "encode_report.json"
AUDIO_FIELDS = ("audio", "audio_lengths")  # what a built record holds of its audio; the rest is copied


SPEECH_PARTS = ("audio", "bridge")  # a LLaSM's frozen speech side: Whisper, and in "decoder" mode the token bridge


def speech_fingerprint(params: dict) -> str:
  """`whisper_fingerprint` of the speech side of a LLaSM's parameters (a pure dict with `audio`, and
  `bridge` in "decoder" mode): what its cached features depend on."""
  parts = dict(params["audio"])
  if "bridge" in params:
    parts["bridge"] = params["bridge"]
  return whisper_fingerprint(parts)


def whisper_fingerprint(audio_params: dict) -> str:
  """A 16-hex-digit identity of Whisper weights (a nested dict of arrays, as `nnx.to_pure_dict`).

  Each leaf's float32 bits are mixed with their index and summed in uint32 arithmetic, whose
  wrap-around sum does not depend on the order of the reduction: the same weights give the
  same fingerprint on any mesh and sharding, computed where the arrays are (no host copy of a
  sharded 1.5 GB Whisper). bfloat16-stored weights give their float32 values' fingerprint, and
  -0.0 counts as 0.0: training adds zero updates to frozen weights, which turns -0.0 into +0.0.
  """
  flat = traverse_util.flatten_dict(audio_params, sep="/")
  paths = sorted(flat)

  def mix(x):
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis in range(x.ndim):  # the flat index, built without reshaping a sharded array
      index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    h = (bits ^ (index * jnp.uint32(0x9E3779B1))) * jnp.uint32(0x85EBCA77)
    h = h ^ (h >> 13)
    return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(h * jnp.uint32(0xC2B2AE3D) ^ index, dtype=jnp.uint32)])

  sums = jax.jit(lambda leaves: [mix(x) for x in leaves])([flat[p] for p in paths])
  digest = hashlib.sha256()
  for p, s in zip(paths, sums):
    digest.update(f"{p}:{tuple(flat[p].shape)}:{np.asarray(s).tolist()};".encode())
  return digest.hexdigest()[:16]


def frame_buckets(mode: str, mel_frames: int) -> tuple[int, ...]:
  """F of the encoding batches: 3000 in "llasm" mode, eighths of the window in the unpadded modes."""
  if mode == "llasm":
    return (MAX_FRAMES,)
  return tuple(sorted({min(mel_frames, -(-mel_frames * q // 16) * 2) for q in range(1, 9)}))


class WhisperRunner:
  """`Llasm.encode_audio` of a model folder's Whisper (the LLM is never read), jitted on a mesh of
  this process's devices; slots in, per-slot features out, batched by length."""

  def __init__(self, ckpt: str, *, batch_size: int = 16, dtype: str = "bfloat16", mel_frames: int = MAX_FRAMES,
               mesh_shape: dict[str, int] | None = None, rules=None):
    meta = checkpoint.read_meta(ckpt)
    if meta["kind"] != "llasm":
      raise UserError(f"--ckpt {ckpt!r} holds a {meta['kind']!r} model; encoding needs a LLaSM model folder (its "
                       "mode and Whisper decide the features): llasm-jax convert --llm LLM --whisper W --out DIR")
    if dtype not in DTYPES:
      raise UserError(f"--dtype {dtype!r}: expected one of {DTYPES}")
    self.cfg: LlasmConfig = checkpoint.config_from_dict("llasm", meta["config"])
    self.ckpt, self.batch_size, self.dtype = ckpt, batch_size, dtype
    self.pcfg = pipeline.PipelineConfig.from_model(self.cfg, mel_frames=mel_frames)
    self.buckets = frame_buckets(self.cfg.mode, self.pcfg.mel_frames)
    self.rules = tuple(tuple(r) for r in (rules or DEFAULT_RULES))
    self.mesh = sharding.make_mesh(mesh_shape or {"data": -1}, devices=jax.local_devices())
    split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if batch_size < 1 or batch_size % split:
      raise UserError(f"--batch {batch_size} must be a positive multiple of data x fsdp = {split} "
                       f"(mesh {dict(self.mesh.shape)} over this process's {len(jax.local_devices())} devices)")
    # The composite's other parts stay abstract: encode_audio reads only the speech side.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llasm(self.cfg, rngs=nnx.Rngs(0))))
    # A copy of the abstract speech parts (tree.map makes new variables), filled from the folder.
    self.speech = jax.tree.map(lambda x: x, nnx.State({k: abstract[k] for k in SPEECH_PARTS if k in abstract}))
    nnx.replace_by_pure_dict(self.speech, checkpoint.restore_parts(ckpt, self.speech, self.mesh, self.rules))
    self.fingerprint = speech_fingerprint(nnx.to_pure_dict(self.speech))
    store = jnp.dtype(dtype)

    def run(speech, mel, mel_lengths):
      model = nnx.merge(graphdef, nnx.State({**abstract, **speech}))
      feats, lengths = model.encode_audio(mel, mel_lengths)
      return feats.astype(store), lengths

    spec = lambda name: jax.sharding.NamedSharding(self.mesh, sharding.logical_spec(contract.BATCH_AXES[name], self.rules))
    speech_sh = jax.tree.map(lambda x: x.sharding, self.speech)
    self.mel_sharding, self.lengths_sharding = spec("mel"), spec("mel_lengths")
    self._run = jax.jit(run, in_shardings=(speech_sh, self.mel_sharding, self.lengths_sharding),
                        out_shardings=(spec("audio_features"), spec("audio_feature_lengths")))

  def marker(self, **info) -> dict[str, Any]:
    return cache.cache_marker(self.cfg, mel_frames=self.pcfg.mel_frames, dtype=self.dtype,
                              whisper_fingerprint=self.fingerprint, **info)

  def bucket(self, frames: int) -> int:
    return next(b for b in self.buckets if frames <= b)

  def __call__(self, mels: list[np.ndarray]) -> list[np.ndarray]:
    """Log-mel float32[M, F_j] per slot -> features [S_j, E] per slot (valid frames only)."""
    n, m = self.batch_size, self.cfg.audio.num_mel_bins
    order = sorted(range(len(mels)), key=lambda k: mels[k].shape[1])
    pending = []
    for start in range(0, len(order), n):
      idx = order[start:start + n]
      f = self.bucket(max(mels[k].shape[1] for k in idx))
      mel = np.zeros((n, 1, m, f), np.float32)
      lengths = np.zeros((n, 1), np.int32)  # rows past the slots: empty (length 0), their output unused
      for b, k in enumerate(idx):
        mel[b, 0, :, :mels[k].shape[1]] = mels[k]
        lengths[b, 0] = mels[k].shape[1]
      args = (jax.device_put(mel, self.mel_sharding), jax.device_put(lengths, self.lengths_sharding))
      # The rules and mesh are active while a new bucket traces: the layers' `constrain` reads them.
      with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
        pending.append((idx, self._run(self.speech, *args)))  # dispatched; the device runs ahead
    out: list[np.ndarray] = [None] * len(mels)  # type: ignore[list-item]
    for idx, (feats, lengths) in pending:
      feats, lengths = np.asarray(feats), np.asarray(lengths)
      for b, k in enumerate(idx):
        out[k] = feats[b, 0, :lengths[b, 0]]
    return out


@dataclasses.dataclass
class EncodeResult:
  path: str  # the dataset folder (OUT/<name>/<version>)
  report_path: str
  report: dict[str, Any]


@dataclasses.dataclass
class _Row:
  record: dict[str, Any]
  slots: list[int]
  mels: list[np.ndarray]
  seconds: float


def _share(n: int) -> tuple[int, int]:
  """This process's contiguous rows [lo, hi) of n."""
  i, count = jax.process_index(), jax.process_count()
  return n * i // count, n * (i + 1) // count


def _features_dict(source: pipeline.Source, dim: int, dtype: str):
  """The source's own feature specs for the copied fields, plus the cached features."""
  import tensorflow_datasets as tfds

  specs = tfds.builder_from_directory(source.paths[0]).info.features
  out = {k: v for k, v in specs.items() if k not in AUDIO_FIELDS}
  out["features"] = tfds.features.Tensor(shape=(None, dim), dtype=jnp.dtype(dtype),
                                         encoding=tfds.features.Encoding.BYTES)
  for k in ("feature_lengths", "mel_lengths", "slots"):
    out[k] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
  return tfds.features.FeaturesDict(out)


def encode(ckpt: str, data: str, out: str, *, dtype: str = "bfloat16", batch_size: int = 16,
           mel_frames: int = MAX_FRAMES, mesh_shape: dict[str, int] | None = None, rules=None,
           overwrite: bool = False, quiet: bool = False, chunk_batches: int = 8,
           threads: int | None = None) -> EncodeResult:
  """Encodes every audio of the built dataset(s) `data` with the Whisper of `ckpt` into `out`.

  `mel_frames`: "encoder" mode window (the training config's `data.mel_frames`, 3000 = 30 s).
  Rows are read in chunks of `chunk_batches` x `batch_size` slots; their log-mel is computed by
  `threads` threads while the device encodes the previous chunk.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.file_adapters import ArrayRecordFileAdapter
  from tqdm import tqdm

  t0 = time.time()
  source = pipeline.Source(data)
  if source.cache is not None:
    raise UserError(f"--data {data!r} already holds cached features; pass the raw dataset `llasm-jax data build` wrote")
  if source.kind == sources.MIXED:
    raise UserError(f"--data {data!r} mixes asr and instructions datasets; encode each kind on its own "
                     "(training reads several caches together: config.data.dir=A,B)")
  name = f"llasm_{source.kind}_features"
  if paths.is_remote(out):
    if jax.process_count() > 1:
      raise UserError(f"--out {out!r}: processes of a multi-host encode write their shards into one folder, "
                       "which must be a shared filesystem; pass the bucket's gcsfuse mount (launch/tpu.sh setup "
                       "--data-bucket) instead of its gs:// URL")
    return builders.staged_dataset(out, name, REPORT, overwrite, lambda local: encode(
        ckpt, data, local, batch_size=batch_size, dtype=dtype, mel_frames=mel_frames, mesh_shape=mesh_shape,
        rules=rules, quiet=quiet, chunk_batches=chunk_batches, threads=threads))
  home = os.path.join(os.path.abspath(out), name)
  path = os.path.join(home, VERSION)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"dataset {path!r} exists; pass --overwrite or choose another --out")
  runner = WhisperRunner(ckpt, batch_size=batch_size, dtype=dtype, mel_frames=mel_frames, mesh_shape=mesh_shape,
                         rules=rules)
  cfg, pcfg = runner.cfg, runner.pcfg
  main = jax.process_index() == 0
  count = jax.process_count()
  spec = _features_dict(source, cfg.feature_dim, dtype)
  lo, hi = _share(len(source))

  def load(index: int) -> _Row:
    record = source[index]
    audios = sources.record_audios(record, source.kind)
    slots, mels = featurize.audio_slots(audios, pcfg)
    return _Row(record, slots, mels, sum(len(a) for a in audios) / SAMPLE_RATE)

  stats = dict(rows=0, audios=0, slots=0, seconds=0.0, feature_frames=0)
  bar = tqdm(total=hi - lo, desc=f"encoding {name} ({cfg.mode} mode)", unit="row", disable=quiet or not main,
             dynamic_ncols=True, file=sys.stderr)

  def chunks() -> Iterator[list[_Row]]:
    """Rows in chunks of chunk_batches x batch_size; the next chunk's log-mel is computed by the
    reader threads (numpy's FFT releases the GIL) while the device encodes this one."""
    per_chunk = max(1, chunk_batches * batch_size)
    starts = list(range(lo, hi, per_chunk))
    with concurrent.futures.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as readers, \
        concurrent.futures.ThreadPoolExecutor(1) as loader:
      load_chunk = lambda s: list(readers.map(load, range(s, min(hi, s + per_chunk))))
      ahead = loader.submit(load_chunk, starts[0]) if starts else None
      for k in range(len(starts)):
        rows = ahead.result()
        ahead = loader.submit(load_chunk, starts[k + 1]) if k + 1 < len(starts) else None
        yield rows

  def examples() -> Iterator[tuple[None, bytes]]:
    for rows in chunks():
      mels = [m for r in rows for m in r.mels]
      feats = runner(mels)
      k = 0
      for r in rows:
        mine = feats[k:k + len(r.mels)]
        k += len(r.mels)
        frames = [int(m.shape[1]) for m in r.mels]
        lengths = [len(f) for f in mine]
        if not all(cfg.feature_length_ok(n, f) for n, f in zip(lengths, frames)):
          raise RuntimeError(f"row {r.record.get('id')!r}: feature lengths {lengths} for mel frames {frames}")
        example = {key: v for key, v in r.record.items() if key not in AUDIO_FIELDS}
        example.update(features=np.concatenate(mine), feature_lengths=np.int32(lengths),
                       mel_lengths=np.int32(frames), slots=np.int32(r.slots))
        stats["rows"] += 1
        stats["audios"] += len(r.slots)
        stats["slots"] += len(mine)
        stats["seconds"] += r.seconds
        stats["feature_frames"] += sum(lengths)
        bar.update(1)
        bar.set_postfix(audios_per_s=f"{stats['audios'] / max(time.time() - t0, 1e-9):.1f}", refresh=False)
        yield None, spec.serialize_example(example)

  with checkpoint.atomic_dir(path, overwrite=overwrite) as tmp:
    template = tfds.core.ShardedFileTemplate(data_dir=tmp, dataset_name=name, split="train",
                                             filetype_suffix="array_record")
    try:
      ArrayRecordFileAdapter.write_examples(template.sharded_filepath(shard_index=jax.process_index(),
                                                                      num_shards=count), examples())
    finally:
      bar.close()
    stats["elapsed_s"] = round(time.time() - t0, 2)
    with open(os.path.join(tmp, f"shard-{jax.process_index():05d}.json"), "w") as f:
      json.dump(stats, f)
    if count > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("llasm_encode_shards_written")
    if main:
      shards = []
      for i in range(count):
        with open(os.path.join(tmp, f"shard-{i:05d}.json")) as f:
          shards.append(json.load(f))
        os.remove(os.path.join(tmp, f"shard-{i:05d}.json"))
      total = {k: sum(s[k] for s in shards) for k in ("rows", "audios", "slots", "seconds", "feature_frames")}
      marker = runner.marker(checkpoint=paths.join(ckpt), source=source.paths)
      split = tfds.core.SplitInfo(name="train", shard_lengths=[s["rows"] for s in shards],
                                  num_bytes=sum(os.path.getsize(template.sharded_filepath(shard_index=i, num_shards=count))
                                                for i in range(count)), filename_template=template)
      # TFDS prints nothing useful here; keep stdout for the summary.
      with contextlib.redirect_stdout(io.StringIO()):
        tfds.folder_dataset.write_metadata(
            data_dir=tmp, features=spec, split_infos=[split], filename_template=template, check_data=False,
            description=f"llasm_jax cached Whisper features ({cfg.mode} mode, {dtype}) of {source.kind} data",
            metadata=tfds.core.MetadataDict(kind=source.kind, sample_rate=SAMPLE_RATE, cache=marker))
  report = None
  if main:
    elapsed = time.time() - t0
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    report = {"dataset": name, "path": path, "source": source.paths, "checkpoint": paths.join(ckpt),
              "mode": cfg.mode, "dtype": dtype, "processes": count, **total,
              "seconds": round(total["seconds"], 2), "elapsed_s": round(elapsed, 2),
              "audios_per_s": round(total["audios"] / elapsed, 2), "bytes": size, "cache": marker}
    with open(os.path.join(home, REPORT), "w") as f:
      json.dump(report, f, indent=1)
  return EncodeResult(path, os.path.join(home, REPORT), report or {})


def summary(result: EncodeResult) -> str:
  """The lines printed at the end of an encode."""
  r = result.report
  return (f"encoded {r['audios']} audios ({r['slots']} slots, {r['seconds'] / 3600:.3f} h of audio) of {r['rows']} "
          f"rows in {r['elapsed_s']:.1f} s: {r['audios_per_s']:.1f} audios/s\n"
          f"dataset {result.path}: {r['mode']} mode, {r['dtype']} features, {r['bytes'] / 2**20:.1f} MiB\n"
          f"report {result.report_path}")
