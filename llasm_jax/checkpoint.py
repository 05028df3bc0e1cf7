"""llasm_jax model folders: an Orbax checkpoint of the parameters plus a JSON model config.

Layout of a folder (what `convert` writes and `generate`, `train` and `export` read):
  llasm_jax.json   kind ("llasm", "llama" or "whisper"), the model config, stored dtype, and for a
                   trained model "prompt": {"template", "system"} it was trained with (the
                   default prompt format of `generate`, `chat`, `eval`; `prompt_record`)
  params/          Orbax checkpoint of the parameter tree
  tokenizer files, preprocessor_config.json (next to them, so one path loads everything)
  whisper/         Whisper's own tokenizer and generation_config.json (for transcription)

A folder may be local or in a bucket (gs://...). Local folders are written under a temporary
name and renamed at the end; in a bucket, llasm_jax.json is written last and a folder without
it reads as incomplete: an interrupted write never leaves a folder that looks complete. Loading restores every array straight into its
target sharding on a mesh (each host reads only its shards), whatever mesh wrote it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from llasm_jax import paths, sharding
from llasm_jax.layers.lora import LoraConfig, is_lora_path
from llasm_jax.models.llama import LlamaConfig, LlamaForCausalLM, RopeScaling
from llasm_jax.models.llasm import Llasm, LlasmConfig
from llasm_jax.models.whisper import WhisperConfig, WhisperModel
from llasm_jax.errors import UserError

META_FILE = "llasm_jax.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
PROMPT_KEY = "prompt"  # meta: {"template": name, "system": text or None} a trained model was prompted with
KINDS = ("llasm", "llama", "whisper")
# What travels with the parameters so that one folder is enough to load and run a model.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
FEATURE_FILES = ("preprocessor_config.json",)
# The sources' own config.json files: `export` keeps the fields llasm_jax does not model.
HF_LLM_CONFIG, HF_WHISPER_CONFIG = "hf_llm_config.json", "hf_whisper_config.json"
# Whisper's own tokenizer and generation config (special tokens, suppressed tokens), which
# transcription needs, in a subfolder: a LLaSM folder's top level holds the LLM's tokenizer.
WHISPER_DIR = "whisper"
WHISPER_FILES = TOKENIZER_FILES + ("normalizer.json",)

def copy_companions(src: str, dst: str) -> None:
  """Copies a model folder's companion files (tokenizer, feature extractor, the sources' HF
  configs, and Whisper's own tokenizer and generation config in whisper/) from `src` to `dst`,
  keeping what `dst` has."""
  paths.copy_files(src, dst, TOKENIZER_FILES + FEATURE_FILES + (HF_LLM_CONFIG, HF_WHISPER_CONFIG))
  paths.copy_files(paths.join(src, WHISPER_DIR), paths.join(dst, WHISPER_DIR), WHISPER_FILES)


def companions(folder: str) -> str:
  """A local folder holding `folder`'s companion files (tokenizers and JSON configs, which
  transformers reads from local files only): `folder` itself, or a download of them from a bucket."""
  return paths.local_copy(folder, TOKENIZER_FILES + FEATURE_FILES + (HF_LLM_CONFIG, HF_WHISPER_CONFIG, META_FILE)
                          + tuple(f"{WHISPER_DIR}/{n}" for n in WHISPER_FILES))


def config_to_dict(cfg) -> dict[str, Any]:
  return dataclasses.asdict(cfg)

def _llama(d: dict) -> LlamaConfig:
  d = dict(d)
  d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
  lora = d.get("lora", {})  # folders written before LoRA have none
  d["lora"] = LoraConfig(**{**lora, "targets": tuple(lora.get("targets", ()))})
  return LlamaConfig(**d)

def config_from_dict(kind: str, d: dict[str, Any]):
  if kind == "llama":
    return _llama(d)
  if kind == "whisper":
    return WhisperConfig(**d)
  if kind == "llasm":
    d = dict(d)
    return LlasmConfig(**{**d, "audio": WhisperConfig(**d["audio"]), "llm": _llama(d["llm"])})
  raise UserError(f"model kind {kind!r}: expected one of {KINDS}")

def build_model(kind: str, cfg, rngs: nnx.Rngs) -> nnx.Module:
  return {"llasm": Llasm, "llama": LlamaForCausalLM, "whisper": WhisperModel}[kind](cfg, rngs=rngs)

def with_run_options(kind: str, cfg, **run):
  """Sets run-time fields (dtype, param_dtype, scan_layers, remat_policy, attention_impl; the LLM's
  vocab_multiple, which a LLaSM's Whisper lacks)."""
  if not run:
    return cfg
  if kind == "llasm":
    audio = {k: v for k, v in run.items() if k in {f.name for f in dataclasses.fields(WhisperConfig)}}
    return cfg.replace(audio=cfg.audio.replace(**audio), llm=cfg.llm.replace(**run))
  return cfg.replace(**run)


def vocab_padding(kind: str, cfg) -> dict[str, tuple[int, ...]]:
  """{slash-joined path: stored shape} of the parameters that `cfg` pads past the real vocab
  (LlamaConfig.vocab_multiple: embedding rows, LM-head columns); {} without padding. Model
  folders hold them unpadded, whatever the run option: `save_params` strips, `load_model` pads."""
  llm = cfg if kind == "llama" else cfg.llm if kind == "llasm" else None
  if llm is None or llm.padded_vocab == llm.vocab_size:
    return {}
  real = llm.replace(vocab_multiple=1)

  def shapes(c):
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: build_model(kind, c, nnx.Rngs(0))))), sep="/")
    return {p: tuple(v.shape) for p, v in flat.items()}

  padded, stored = shapes(cfg), shapes(real if kind == "llama" else cfg.replace(llm=real))
  return {p: shape for p, shape in stored.items() if padded[p] != shape}


def strip_vocab_padding(kind: str, cfg, params: dict[str, Any]) -> dict[str, Any]:
  """`params` (slash-joined path -> array) with the padded vocab rows / columns cut off."""
  cut = vocab_padding(kind, cfg)
  return {p: x[tuple(slice(0, n) for n in cut[p])] if p in cut and tuple(x.shape) != cut[p] else x
          for p, x in params.items()}


def _unpadded_targets(kind: str, cfg, item: dict) -> tuple[dict, dict[str, jax.ShapeDtypeStruct]]:
  """The restore target `item` with the padded vocab arrays at their stored shapes (placed as
  near their final sharding as the shape divides), and {path: padded target} of those."""
  cut = vocab_padding(kind, cfg)
  flat = traverse_util.flatten_dict(item, sep="/")
  padded = {p: flat[p] for p in cut if p in flat}
  for p, t in padded.items():
    sh = t.sharding
    if isinstance(sh, jax.sharding.NamedSharding):
      sh = jax.sharding.NamedSharding(sh.mesh, sharding.divisible_spec(cut[p], sh.spec, sh.mesh))
    flat[p] = jax.ShapeDtypeStruct(cut[p], t.dtype, sharding=sh)
  return traverse_util.unflatten_dict(flat, sep="/"), padded


def _pad_restored(restored: dict, padded: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """The arrays restored at their stored shapes, zero-padded to their `padded` targets, in their shardings."""
  if not padded:
    return restored
  flat = traverse_util.flatten_dict(restored, sep="/")
  for p, t in padded.items():
    pad = lambda x, t=t: jnp.pad(x, [(0, want - have) for have, want in zip(x.shape, t.shape)])
    flat[p] = jax.jit(pad, out_shardings=t.sharding)(flat[p])
  return traverse_util.unflatten_dict(flat, sep="/")

@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields the folder to write `path` into, which readers see only once the block completes.

  Locally: a temporary sibling renamed to `path` at the end. On an object store (no rename):
  `path` itself, whose META_FILE `save_params` writes last, and readers treat a folder without
  it as incomplete; an old folder there loses its META_FILE first, so it never reads as the new
  one. Every process of a multi-host run gets the same folder (they write their shards into
  it); process 0 alone creates, renames and removes, between barriers.
  """
  target = paths.resolve(path)
  main = jax.process_index() == 0
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} exists; choose another --out or pass --overwrite")
  if paths.is_remote(target):
    if main and target.exists():
      (target / META_FILE).unlink(missing_ok=True)
      target.rmtree()
    _barrier("atomic_dir_start")
    yield os.fspath(target)
    _barrier("atomic_dir_end")
    return
  tmp = target.with_name(f"{target.name}.incomplete")
  if main:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  _barrier("atomic_dir_start")
  try:
    yield os.fspath(tmp)
  except BaseException:
    if main:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  _barrier("atomic_dir_end")
  if main:
    if target.exists():
      shutil.rmtree(target)
    os.rename(tmp, target)
  _barrier("atomic_dir_renamed")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def save_params(folder: str, kind: str, cfg, params: dict[str, Any], *, stored_dtype: str,
                extra: dict[str, Any] | None = None) -> None:
  """Writes `params` (slash-joined path -> array) and the meta file into `folder` (which exists).
  A padded vocab (LlamaConfig.vocab_multiple) is stored unpadded, so folders do not depend on it."""
  tree = traverse_util.unflatten_dict(strip_vocab_padding(kind, cfg, params), sep="/")
  # Measured on a 2.6 GiB checkpoint (bench/convert_speed.py): Orbax's defaults peak at
  # 3x the model size. Host arrays are written as they are (the default deep-copies each;
  # this save is synchronous), in 64 MiB chunks, without OCDBT (whose write cache holds
  # everything until the end): the peak stays near the model size.
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      save_concurrent_gb=1, type_handler_registry=registry, use_ocdbt=False))
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=64 << 20), tree)
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # without OCDBT, Orbax warns at every save that it has nothing to merge
  try:
    ckptr.save(paths.join(folder, PARAMS_DIR), args=ocp.args.PyTreeSave(tree, save_args=save_args))
  finally:
    absl_log.setLevel(level)
  meta = dict(format=FORMAT_VERSION, kind=kind, config=config_to_dict(cfg), stored_dtype=stored_dtype,
              **(extra or {}))
  if jax.process_index() == 0:  # last: its presence marks the folder complete (object stores)
    paths.write_json(paths.join(folder, META_FILE), meta)

def prompt_record(meta: dict[str, Any]) -> dict[str, Any] | None:
  """The {"template", "system"} a folder's meta records (what the model was trained with), or None
  (a converted folder, or one written before the record existed)."""
  record = meta.get(PROMPT_KEY)
  return dict(record) if isinstance(record, dict) else None

def read_meta(folder: str) -> dict[str, Any]:
  """The model folder's metadata (kind, config, ...); a missing folder or file is a named error."""
  folder = paths.resolve(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"--ckpt {os.fspath(folder)!r}: no such folder; pass a folder written by "
                            "`llasm-jax convert` or `train`")
  path = folder / META_FILE
  if not path.exists():
    if (folder / PARAMS_DIR).exists():
      raise UserError(f"{folder}: no {META_FILE}, so its write did not finish (interrupted); write it again "
                       "(`llasm-jax convert --overwrite`, or resume the training that makes it)")
    raise UserError(f"{folder}: no {META_FILE}, so not a llasm_jax checkpoint; "
                     "make one with `llasm-jax convert` (or pass the folder `train` wrote)")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT_VERSION:
    raise UserError(f"{path}: format {meta.get('format')}, this llasm_jax reads format {FORMAT_VERSION}")
  return meta

def load_model(folder: str, *, mesh: jax.sharding.Mesh | None = None, rules=None, cfg=None, seed: int = 0,
               **run) -> tuple[nnx.Module, dict[str, Any]]:
  """Restores a model from `folder`, each array placed directly in its target sharding.

  With a mesh and logical axis rules the parameters land sharded; without, on the default
  device. Parameters are cast to the config's `param_dtype` (or the `param_dtype` given).
  `cfg` replaces the stored config whole (same architecture, other run options per part), except
  that it may add LoRA to a folder without: the new factors start as a random init from `seed`
  starts them (B = 0), so the model computes what the folder's does (stage 2 with LoRA).
  """
  meta = read_meta(folder)
  if cfg is None:
    cfg = with_run_options(meta["kind"], config_from_dict(meta["kind"], meta["config"]), **run)
  abstract = nnx.eval_shape(lambda: build_model(meta["kind"], cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = _restore_target(state, mesh, rules)
  stored, new_factors = _split_new_lora(folder, meta, cfg, nnx.to_pure_dict(target))
  stored, padded = _unpadded_targets(meta["kind"], cfg, stored)  # folders hold the real vocab
  restored = _pad_restored(ocp.StandardCheckpointer().restore(paths.join(folder, PARAMS_DIR), stored), padded)
  if new_factors:
    flat = {**traverse_util.flatten_dict(restored, sep="/"), **_init_params(meta["kind"], cfg, new_factors, seed)}
    restored = traverse_util.unflatten_dict(flat, sep="/")
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), meta


def lora_of(kind: str, cfg) -> LoraConfig:
  """The LoRA of a model config of `kind` (LoraConfig() when it has none, as Whisper)."""
  llm = cfg if kind == "llama" else cfg.llm if kind == "llasm" else None
  return llm.lora if llm is not None else LoraConfig()


def _split_new_lora(folder: str, meta: dict, cfg, item: dict) -> tuple[dict, dict]:
  """(the part of the restore target `item` that the folder holds, {path: target} of the LoRA
  factors that `cfg` adds to it). The folder's own factors load as they are when `cfg` has the
  same rank and targets (alpha and dropout are `cfg`'s); other ones cannot be reshaped."""
  kind = meta["kind"]
  stored, wanted = lora_of(kind, config_from_dict(kind, meta["config"])), lora_of(kind, cfg)
  if (stored.rank, stored.targets) == (wanted.rank, wanted.targets):
    return item, {}
  if stored.rank:
    raise UserError(f"{folder}: holds LoRA factors of rank {stored.rank} on {list(stored.targets)}, the config "
                     f"asks for rank {wanted.rank} on {list(wanted.targets)}; keep the folder's LoRA settings "
                     "(config.train.lora), or merge its factors first: `llasm-jax export --merge-lora`, then "
                     "`llasm-jax convert` the merged folders")
  flat = traverse_util.flatten_dict(item, sep="/")
  return (traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_lora_path(p)}, sep="/"),
          {p: v for p, v in flat.items() if is_lora_path(p)})


def _init_params(kind: str, cfg, targets: dict[str, jax.ShapeDtypeStruct], seed: int) -> dict[str, jax.Array]:
  """The random init of the parameters at `targets` (flat paths), in their shardings: the values
  a whole model from `nnx.Rngs(seed)` gets, computed without the rest of it (XLA drops that)."""
  def init():
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(build_model(kind, cfg, nnx.Rngs(seed)))), sep="/")
    return {p: flat[p] for p in targets}

  return jax.jit(init, out_shardings={p: t.sharding for p, t in targets.items()})()

def _restore_target(state, mesh: jax.sharding.Mesh | None, rules):
  """ShapeDtypeStructs of `state` in their shardings: from the rules on `mesh`, else the default device."""
  if mesh is not None:
    shardings = sharding.state_shardings(state, mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, state)
  return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)


def load_whisper(folder: str, *, mesh: jax.sharding.Mesh | None = None, rules=None,
                 **run) -> tuple[WhisperModel, dict[str, Any]]:
  """The Whisper of a "whisper" folder, or the `audio` part of a "llasm" folder restored alone
  (the LLM's arrays are never read), placed as `load_model` places them."""
  meta = read_meta(folder)
  if meta["kind"] == "whisper":
    return load_model(folder, mesh=mesh, rules=rules, **run)
  if meta["kind"] != "llasm":
    raise UserError(f"{folder}: a {meta['kind']!r} model holds no Whisper; pass a 'whisper' or 'llasm' model folder")
  cfg = config_from_dict("llasm", meta["config"])
  wcfg = cfg.audio.replace(**run)
  # "encoder" mode folders store the encoder alone
  abstract = nnx.eval_shape(lambda: WhisperModel(wcfg, rngs=nnx.Rngs(0), with_decoder=cfg.with_decoder))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, restore_parts(folder, nnx.State({"audio": state}), mesh, rules)["audio"])
  return nnx.merge(graphdef, state), {**meta, "kind": "whisper", "config": config_to_dict(wcfg), "part": "audio"}


def restore_parts(folder: str, state: nnx.State, mesh: jax.sharding.Mesh | None, rules) -> dict[str, Any]:
  """The arrays of some top-level parts of a "llasm" folder (`state`: the abstract state of those
  parts, keyed by part), restored alone as a pure dict, placed as `load_model` places them."""
  item = nnx.to_pure_dict(_restore_target(state, mesh, rules))
  args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item)
  return ocp.PyTreeCheckpointer().restore(
      paths.join(folder, PARAMS_DIR), args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))

def load_params_numpy(folder: str) -> dict[str, np.ndarray]:
  """Slash-joined path -> host numpy array, as stored (no devices involved)."""
  path = paths.join(folder, PARAMS_DIR)
  read_meta(folder)
  ckptr = ocp.PyTreeCheckpointer()
  structure = ckptr.metadata(path)
  tree = getattr(structure, "item_metadata", structure)
  tree = getattr(tree, "tree", tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return traverse_util.flatten_dict(restored, sep="/")
