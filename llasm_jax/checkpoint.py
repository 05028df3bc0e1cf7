"""llasm_jax model folders: an Orbax checkpoint of the parameters plus a JSON model config.

Layout of a folder (what `convert` writes and `generate`, `train` and `export` read):
  llasm_jax.json   kind ("llasm", "llama" or "whisper"), the model config, stored dtype
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
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from llasm_jax import paths, sharding
from llasm_jax.models.llama import LlamaConfig, LlamaForCausalLM, RopeScaling
from llasm_jax.models.llasm import Llasm, LlasmConfig
from llasm_jax.models.whisper import WhisperConfig, WhisperModel

META_FILE = "llasm_jax.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
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
  return LlamaConfig(**d)

def config_from_dict(kind: str, d: dict[str, Any]):
  if kind == "llama":
    return _llama(d)
  if kind == "whisper":
    return WhisperConfig(**d)
  if kind == "llasm":
    d = dict(d)
    return LlasmConfig(**{**d, "audio": WhisperConfig(**d["audio"]), "llm": _llama(d["llm"])})
  raise ValueError(f"model kind {kind!r}: expected one of {KINDS}")

def build_model(kind: str, cfg, rngs: nnx.Rngs) -> nnx.Module:
  return {"llasm": Llasm, "llama": LlamaForCausalLM, "whisper": WhisperModel}[kind](cfg, rngs=rngs)

def with_run_options(kind: str, cfg, **run):
  """Sets run-time fields (dtype, param_dtype, scan_layers, remat_policy, attention_impl)."""
  if not run:
    return cfg
  if kind == "llasm":
    return cfg.replace(audio=cfg.audio.replace(**run), llm=cfg.llm.replace(**run))
  return cfg.replace(**run)

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
  """Writes `params` (slash-joined path -> array) and the meta file into `folder` (which exists)."""
  tree = traverse_util.unflatten_dict(params, sep="/")
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

def read_meta(folder: str) -> dict[str, Any]:
  """The model folder's metadata (kind, config, ...); a missing folder or file is a named error."""
  folder = paths.resolve(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"--ckpt {os.fspath(folder)!r}: no such folder; pass a folder written by "
                            "`llasm-jax convert` or `train`")
  path = folder / META_FILE
  if not path.exists():
    if (folder / PARAMS_DIR).exists():
      raise ValueError(f"{folder}: no {META_FILE}, so its write did not finish (interrupted); write it again "
                       "(`llasm-jax convert --overwrite`, or resume the training that makes it)")
    raise ValueError(f"{folder}: no {META_FILE}, so not a llasm_jax checkpoint; "
                     "make one with `llasm-jax convert` (or pass the folder `train` wrote)")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT_VERSION:
    raise ValueError(f"{path}: format {meta.get('format')}, this llasm_jax reads format {FORMAT_VERSION}")
  return meta

def load_model(folder: str, *, mesh: jax.sharding.Mesh | None = None, rules=None, cfg=None,
               **run) -> tuple[nnx.Module, dict[str, Any]]:
  """Restores a model from `folder`, each array placed directly in its target sharding.

  With a mesh and logical axis rules the parameters land sharded; without, on the default
  device. Parameters are cast to the config's `param_dtype` (or the `param_dtype` given).
  `cfg` replaces the stored config whole (same architecture, other run options per part).
  """
  meta = read_meta(folder)
  if cfg is None:
    cfg = with_run_options(meta["kind"], config_from_dict(meta["kind"], meta["config"]), **run)
  abstract = nnx.eval_shape(lambda: build_model(meta["kind"], cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = _restore_target(state, mesh, rules)
  restored = ocp.StandardCheckpointer().restore(
      paths.join(folder, PARAMS_DIR), nnx.to_pure_dict(target))
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), meta

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
    raise ValueError(f"{folder}: a {meta['kind']!r} model holds no Whisper; pass a 'whisper' or 'llasm' model folder")
  cfg = config_from_dict("llasm", meta["config"])
  wcfg = cfg.audio.replace(**run)
  with_decoder = cfg.mode == "llasm"  # "encoder" mode folders store the encoder alone
  abstract = nnx.eval_shape(lambda: WhisperModel(wcfg, rngs=nnx.Rngs(0), with_decoder=with_decoder))
  graphdef, state = nnx.split(abstract)
  target = _restore_target(state, mesh, rules)
  item = {"audio": nnx.to_pure_dict(target)}
  args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item)
  restored = ocp.PyTreeCheckpointer().restore(
      paths.join(folder, PARAMS_DIR),
      args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
  nnx.replace_by_pure_dict(state, restored["audio"])
  return nnx.merge(graphdef, state), {**meta, "kind": "whisper", "config": config_to_dict(wcfg), "part": "audio"}

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
