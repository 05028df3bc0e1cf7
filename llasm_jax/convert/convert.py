"""`llasm-jax convert`: Hugging Face folders -> a llasm_jax model folder, one tensor at a time.

Sources (see LLASM.md for the released layout):
  --llm LLASM --whisper W   a released LLaSM checkpoint (`model_type: "llaaa"`): everything
  --llm BASE  --whisper W   a base LLM: a fresh model for stage 1 (audio tokens appended,
                            new embedding rows = mean of the old rows, adaptor initialised)
  --whisper W               Whisper alone
  --llm BASE                a text-only LLM
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llasm_jax import checkpoint
from llasm_jax.convert.configs import llama_config_from_hf, whisper_config_from_hf
from llasm_jax.convert.hf import check_complete, fill_params, flat_params, keymaps, whisper_name
from llasm_jax.convert.reader import CheckpointError, HFCheckpoint, read_json
from llasm_jax.models.adaptor import LinearAdaptor, StackedMLPAdaptor
from llasm_jax.models.llasm import LlasmConfig
from llasm_jax.models.whisper import sinusoids

AUDIO_TOKENS = ("<au_patch>", "<au_start>", "<au_end>")
HF_LLM_CONFIG = "hf_llm_config.json"
HF_WHISPER_CONFIG = "hf_whisper_config.json"
EMBED_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclasses.dataclass
class Summary:
  out: str
  kind: str
  tensors: int = 0
  bytes_read: int = 0
  seconds: float = 0.0

  def __str__(self):
    mb = self.bytes_read / 2**20
    return (f"converted {self.tensors} tensors ({mb:.1f} MiB) into {self.out} [{self.kind}] in "
            f"{self.seconds:.1f} s ({mb / max(self.seconds, 1e-9):.1f} MiB/s)")


def _audio_token_ids(llm: HFCheckpoint) -> tuple[int, int, int]:
  """The ids of <au_patch>, <au_start>, <au_end> in a released LLaSM folder."""
  added = os.path.join(llm.folder, "added_tokens.json")
  table = read_json(added) if os.path.exists(added) else {}
  if all(t in table for t in AUDIO_TOKENS):
    return tuple(int(table[t]) for t in AUDIO_TOKENS)
  v = llm.config["vocab_size"]  # as released: appended after the base vocabulary, in this order
  return v - 3, v - 2, v - 1


def _append_audio_tokens(llm_dir: str, out: str, vocab_size: int) -> tuple[tuple[int, int, int], int]:
  """Adds the audio tokens to the LLM's tokenizer (saved into `out`); returns ids and new vocab."""
  has_tokenizer = any(os.path.exists(os.path.join(llm_dir, f)) for f in ("tokenizer.model", "tokenizer.json"))
  if not has_tokenizer:
    ids = (vocab_size, vocab_size + 1, vocab_size + 2)
    print(f"note: {llm_dir} has no tokenizer; audio tokens take ids {ids} and no tokenizer is written")
    return ids, vocab_size + 3
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(llm_dir)
  tok.add_tokens(list(AUDIO_TOKENS), special_tokens=True)
  tok.save_pretrained(out)
  ids = tuple(tok.convert_tokens_to_ids(t) for t in AUDIO_TOKENS)
  return ids, max(vocab_size, max(ids) + 1)


def _with_mean_rows(tensors: Iterator[tuple[str, np.ndarray]], vocab: int) -> Iterator[tuple[str, np.ndarray]]:
  """Grows embedding/LM-head rows to `vocab`; new rows are the mean of the existing ones."""
  for name, array in tensors:
    if name in EMBED_ROWS and array.shape[0] < vocab:
      mean = np.asarray(array, np.float64).mean(axis=0, keepdims=True).astype(array.dtype)
      array = np.concatenate([array, np.repeat(mean, vocab - array.shape[0], axis=0)])
    yield name, array


def _fresh_adaptor(cfg: LlasmConfig, seed: int) -> dict[str, np.ndarray]:
  kw = dict(dtype=cfg.llm.dtype, param_dtype="float32", rngs=nnx.Rngs(seed))
  if cfg.mode == "llasm":
    adaptor = LinearAdaptor(cfg.audio.d_model, cfg.llm.hidden_size, **kw)
  else:
    adaptor = StackedMLPAdaptor(cfg.audio.d_model, cfg.llm.hidden_size, cfg.stack_factor, cfg.adaptor_hidden, **kw)
  return {f"adaptor/{k}": np.asarray(v) for k, v in flat_params(adaptor).items()}


def plan(llm_dir: str | None, whisper_dir: str | None, mode: str, out_tmp: str):
  """Works out the model kind and config; returns (kind, cfg, sources, extra params, meta)."""
  llm = HFCheckpoint(llm_dir) if llm_dir else None
  whisper = HFCheckpoint(whisper_dir) if whisper_dir else None
  if llm is None and whisper is None:
    raise CheckpointError("nothing to convert: pass --llm DIR, --whisper DIR, or both")
  sources: list[tuple[HFCheckpoint, Any]] = []
  extra: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {"sources": {"llm": llm_dir, "whisper": whisper_dir}}
  if whisper is not None:
    wcfg = whisper_config_from_hf(whisper.config)
  if llm is None:
    sources.append((whisper, lambda t: ((whisper_name(n), a) for n, a in t)))
    return "whisper", wcfg, sources, extra, meta, keymaps("whisper")
  released = llm.config.get("model_type") == "llaaa"
  lcfg = llama_config_from_hf(llm.config)
  if whisper is None:
    if released:
      raise CheckpointError(f"{llm_dir} is a LLaSM checkpoint; pass its Whisper folder with --whisper "
                            f"(its config names {llm.config.get('mm_audio_tower')!r})")
    sources.append((llm, None))
    return "llama", lcfg, sources, extra, meta, keymaps("llama")
  if released:
    saved_mode = llm.config.get("llasm_jax_mode", "llasm")
    if mode != saved_mode:
      raise CheckpointError(f"{llm_dir} holds a {saved_mode!r}-mode adaptor; convert it with --mode {saved_mode}")
    ids = _audio_token_ids(llm)
    cfg = LlasmConfig(audio=wcfg, llm=lcfg, mode=mode, audio_token_len=llm.config.get("audio_token_len", 64),
                      stack_factor=llm.config.get("llasm_jax_stack_factor", 8),
                      adaptor_hidden=llm.config.get("llasm_jax_adaptor_hidden"),
                      audio_patch_id=ids[0], audio_start_id=ids[1], audio_end_id=ids[2])
    sources.append((llm, None))
  else:
    ids, vocab = _append_audio_tokens(llm.folder, out_tmp, lcfg.vocab_size)
    lcfg = lcfg.replace(vocab_size=vocab)
    cfg = LlasmConfig(audio=wcfg, llm=lcfg, mode=mode, audio_patch_id=ids[0], audio_start_id=ids[1],
                      audio_end_id=ids[2])
    sources.append((llm, lambda t: _with_mean_rows(t, vocab)))
    extra = _fresh_adaptor(cfg, seed=0)
    meta["fresh"] = "audio token rows = mean of existing rows; adaptor randomly initialised"
  sources.append((whisper, lambda t: ((whisper_name(n), a) for n, a in t)))
  return "llasm", cfg, sources, extra, meta, keymaps("llasm", mode)


def convert(llm_dir: str | None = None, whisper_dir: str | None = None, *, out: str, dtype: str = "float32",
            mode: str = "llasm", overwrite: bool = False, progress: bool = True, _on_tensor=None) -> Summary:
  """Converts HF folders into a llasm_jax model folder at `out` (see the module docstring).

  `_on_tensor(name)` is a test hook, called before each tensor is placed.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype {dtype!r}: expected float32 or bfloat16")
  start = time.perf_counter()
  with checkpoint.atomic_dir(out, overwrite=overwrite) as tmp:
    kind, cfg, sources, extra, meta, maps = plan(llm_dir, whisper_dir, mode, tmp)
    abstract = nnx.eval_shape(lambda: checkpoint.build_model(kind, cfg, nnx.Rngs(0)))
    shapes = jax.tree.map(lambda v: v.shape, flat_params(abstract))
    np_dtype = jnp.dtype(dtype)
    dest = {p: np.empty(s, np_dtype) for p, s in shapes.items() if p not in extra}
    summary = Summary(out=os.path.abspath(out), kind=kind)
    total = sum(src.nbytes for src, _ in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress)

    def count(name, array):
      if _on_tensor is not None:
        _on_tensor(name)
      summary.tensors += 1
      summary.bytes_read += array.nbytes
      bar.update(array.nbytes)

    filled: dict[str, int] = {}
    for src, wrap in sources:
      stream = src.tensors() if wrap is None else wrap(src.tensors())
      filled.update(fill_params(dest, stream, maps, on_tensor=count))
    bar.close()
    positions = [p for p in dest if p.endswith("encoder/embed_positions") and p not in filled]
    for p in positions:
      dest[p][...] = sinusoids(*dest[p].shape)
    check_complete(dest, filled, optional=positions)
    dest.update({k: v.astype(np_dtype) for k, v in extra.items()})
    checkpoint.save_params(tmp, kind, cfg, dest, stored_dtype=dtype, extra=meta)
    del dest
    # The source configs travel along, so `export` keeps the fields llasm_jax does not model.
    if llm_dir:
      checkpoint.copy_files(llm_dir, tmp, checkpoint.TOKENIZER_FILES)
      shutil.copy2(os.path.join(llm_dir, "config.json"), os.path.join(tmp, HF_LLM_CONFIG))
    if whisper_dir:
      checkpoint.copy_files(whisper_dir, tmp, checkpoint.FEATURE_FILES)
      os.makedirs(os.path.join(tmp, checkpoint.WHISPER_DIR), exist_ok=True)
      checkpoint.copy_files(whisper_dir, os.path.join(tmp, checkpoint.WHISPER_DIR), checkpoint.WHISPER_FILES)
      shutil.copy2(os.path.join(whisper_dir, "config.json"), os.path.join(tmp, HF_WHISPER_CONFIG))
  summary.seconds = time.perf_counter() - start
  return summary
