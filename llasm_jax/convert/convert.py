"""`llasm-jax convert`: checkpoints -> a llasm_jax model folder, one tensor at a time.

Sources (see LLASM.md for the released layout):
  --llm LLASM --whisper W   a released LLaSM checkpoint (`model_type: "llaaa"`): everything
  --llm BASE  --whisper W   a base LLM: a fresh model for stage 1 (audio tokens appended,
                            new embedding rows = mean of the old rows, adaptor initialised;
                            --mode encoder: --adaptor mlp or ultravox, see `plan`)
  --whisper W               Whisper alone
  --llm BASE                a text-only LLM

BASE is a Hugging Face folder or a GGUF file (`gguf.py`); W is a Hugging Face folder or a
CTranslate2 Whisper folder (`ct2.py`); each is recognised by what it holds (`sources.py`).
Next to the parameters the folder gets the LLM's tokenizer and generation config, Whisper's
preprocessor_config.json, Whisper's own tokenizer and generation config in `whisper/`, and
the sources' HF configs (read or synthesized) for `export`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llasm_jax import checkpoint, paths
from llasm_jax.tokens import MARKERS
from llasm_jax.convert.configs import llama_config_from_hf, whisper_config_from_hf
from llasm_jax.convert.hf import check_complete, fill_params, flat_params, keymaps, whisper_name
from llasm_jax.convert.keymap import KeyMap
from llasm_jax.convert.reader import CheckpointError, read_json
from llasm_jax.convert.sources import open_source
from llasm_jax.models.adaptor import text_scale
from llasm_jax.models.llasm import ADAPTORS, LlasmConfig, build_adaptor
from llasm_jax.models.whisper import sinusoids
from llasm_jax.errors import UserError

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


def _audio_token_ids(llm) -> tuple[int, int, int]:
  """The ids of <au_patch>, <au_start>, <au_end> in a released LLaSM folder."""
  added = os.path.join(llm.folder, "added_tokens.json")
  table = read_json(added) if os.path.exists(added) else {}
  if all(t in table for t in MARKERS):
    return tuple(int(table[t]) for t in MARKERS)
  v = llm.config["vocab_size"]  # as released: appended after the base vocabulary, in this order
  return v - 3, v - 2, v - 1


def _with_audio_tokens(tokenizer, vocab_size: int, source: str):
  """The LLM tokenizer with the audio tokens added (None without one), their ids and the new vocab size."""
  if tokenizer is None:
    ids = (vocab_size, vocab_size + 1, vocab_size + 2)
    print(f"note: {source} has no tokenizer; audio tokens take ids {ids} and no tokenizer is written")
    return None, ids, vocab_size + 3
  tokenizer.add_tokens(list(MARKERS), special_tokens=True)
  ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in MARKERS)
  return tokenizer, ids, max(vocab_size, max(ids) + 1)


def _with_mean_rows(tensors: Iterator[tuple[str, np.ndarray]], vocab: int) -> Iterator[tuple[str, np.ndarray]]:
  """Grows embedding/LM-head rows to `vocab`; new rows are the mean of the existing ones."""
  for name, array in tensors:
    if name in EMBED_ROWS and array.shape[0] < vocab:
      mean = np.asarray(array, np.float64).mean(axis=0, keepdims=True).astype(array.dtype)
      array = np.concatenate([array, np.repeat(mean, vocab - array.shape[0], axis=0)])
    yield name, array


def _fresh_adaptor(cfg: LlasmConfig, seed: int) -> dict[str, np.ndarray]:
  adaptor = build_adaptor(cfg, dtype=cfg.llm.dtype, param_dtype="float32", rngs=nnx.Rngs(seed))
  return {f"adaptor/{k}": np.asarray(v) for k, v in flat_params(adaptor).items()}


def _whisper_stream(tensors):
  return ((whisper_name(n), a) for n, a in tensors)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a conversion will write, worked out from the sources without writing anything.

  sources: (role, source, wrap) triples; `wrap` turns the source's tensor stream into the one
  to store (renamed, rows appended) or is None. extra: parameters made here rather than read
  (a fresh adaptor). tokenizer: the LLM tokenizer with the audio tokens added, to save, or None
  (the source's own tokenizer files are then copied as they are). match_text_scale: the fresh
  adaptor's output scale is set from the converted embedding table (`Llasm.match_text_scale`'s rule).
  """

  kind: str
  cfg: Any
  sources: tuple[tuple[str, Any, Callable | None], ...]
  extra: Mapping[str, np.ndarray]
  meta: Mapping[str, Any]
  keymaps: tuple[KeyMap, ...]
  tokenizer: Any = None
  match_text_scale: bool = False
  bridge_ids: np.ndarray | None = None  # "decoder" mode: the LLM token of each Whisper token (`bridge_ids`)
  filler_id: int | None = None  # "decoder" mode: the LLM token whose embedding the adaptor's filler starts at


def plan(llm_path: str | None, whisper_path: str | None, mode: str = "llasm", adaptor: str | None = None,
         stack_factor: int | None = None, adaptor_hidden: int | None = None, audio_tokens: int | None = None) -> Plan:
  """Works out the model kind, its config and where each parameter comes from; reads only.

  adaptor: the "encoder"-mode projector of a new model (one of ADAPTORS; None = "mlp"),
  stack_factor its encoder frames per audio token (None = 8) and adaptor_hidden its inner width
  (None = the LLM's); a released folder's are the ones it records. audio_tokens: a new
  "decoder"-mode model's transcript tokens per audio window (None = 64), what the LLM reads of each."""
  if audio_tokens is not None and mode != "decoder":
    raise UserError(f"--audio-tokens {audio_tokens}: only 'decoder' mode takes it (in 'encoder' mode the audio's "
                     "length decides its tokens; 'llasm' mode has the 64 of the released checkpoints)")
  if adaptor is not None and adaptor not in ADAPTORS:
    raise UserError(f"--adaptor {adaptor!r}: expected one of {', '.join(ADAPTORS)}")
  if stack_factor is not None and stack_factor < 1:
    raise UserError(f"--stack-factor {stack_factor}: expected encoder frames per audio token, >= 1")
  if adaptor_hidden is not None and adaptor_hidden < 1:
    raise UserError(f"--adaptor-hidden {adaptor_hidden}: expected the adaptor's inner width, >= 1")
  if llm_path is None and whisper_path is None:
    raise CheckpointError("nothing to convert: pass --llm PATH, --whisper PATH, or both")
  llm = open_source(llm_path, "llm") if llm_path else None
  whisper = open_source(whisper_path, "whisper") if whisper_path else None
  meta: dict[str, Any] = {"sources": {"llm": llm_path, "whisper": whisper_path},
                          "source_formats": {r: s.format for r, s in (("llm", llm), ("whisper", whisper)) if s}}

  def done(kind, cfg, sources, maps, extra=None, tokenizer=None, match_text_scale=False, bridge=None, filler=None):
    return Plan(kind, cfg, tuple(sources), MappingProxyType(extra or {}), MappingProxyType(meta), tuple(maps),
                tokenizer, match_text_scale, bridge, filler)

  if whisper is not None:
    wcfg = whisper_config_from_hf(whisper.config)
  if llm is None:
    return done("whisper", wcfg, [("whisper", whisper, _whisper_stream)], keymaps("whisper"))
  released = llm.config.get("model_type") == "llaaa"
  lcfg = llama_config_from_hf(llm.config)
  if whisper is None:
    if released:
      raise CheckpointError(f"{llm_path} is a LLaSM checkpoint; pass its Whisper folder with --whisper "
                            f"(its config names {llm.config.get('mm_audio_tower')!r})")
    return done("llama", lcfg, [("llm", llm, None)], keymaps("llama"))
  if released and mode == "decoder":
    raise CheckpointError(f"{llm_path} is a LLaSM checkpoint; 'decoder' mode makes a new model from a base LLM")
  if released:
    saved_mode = llm.config.get("llasm_jax_mode", "llasm")
    if mode != saved_mode:
      raise CheckpointError(f"{llm_path} holds a {saved_mode!r}-mode adaptor; convert it with --mode {saved_mode}")
    saved_adaptor = llm.config.get("llasm_jax_adaptor", "mlp")
    if adaptor not in (None, saved_adaptor):
      raise CheckpointError(f"{llm_path} holds a {saved_adaptor!r} adaptor; convert it with --adaptor {saved_adaptor} "
                            "(or without --adaptor)")
    ids = _audio_token_ids(llm)
    cfg = LlasmConfig(audio=wcfg, llm=lcfg, mode=mode, audio_token_len=llm.config.get("audio_token_len", 64),
                      stack_factor=llm.config.get("llasm_jax_stack_factor", 8),
                      adaptor_hidden=llm.config.get("llasm_jax_adaptor_hidden"), adaptor=saved_adaptor,
                      audio_patch_id=ids[0], audio_start_id=ids[1], audio_end_id=ids[2])
    return done("llasm", cfg, [("llm", llm, None), ("whisper", whisper, _whisper_stream)], keymaps("llasm", mode))
  tokenizer, ids, vocab = _with_audio_tokens(llm.tokenizer(), lcfg.vocab_size, llm_path)
  lcfg = lcfg.replace(vocab_size=vocab)
  decoding, bridge, filler = {}, None, None
  if mode == "decoder":
    # The filler (the places of an audio its transcript leaves) starts as a space: measured on the
    # frozen SmolLM2, 51 zero vectors before a transcript make it repeat the instruction, 51 spaces
    # let it read the transcript.
    filler = tokenizer.encode(" ", add_special_tokens=False)[0]
    if tokenizer is None:
      raise CheckpointError(f"{llm_path}: 'decoder' mode maps Whisper's tokens to the LLM's and needs the LLM's tokenizer")
    decoding = _decoding(whisper, wcfg, audio_tokens)
    bridge = bridge_ids(_whisper_tokenizer(whisper, whisper_path), tokenizer, wcfg.vocab_size, decoding["decoder_eos"])
  cfg = LlasmConfig(audio=wcfg, llm=lcfg, mode=mode, adaptor=adaptor or "mlp", audio_patch_id=ids[0],
                    audio_start_id=ids[1], audio_end_id=ids[2], adaptor_hidden=adaptor_hidden,
                    **({"stack_factor": stack_factor} if stack_factor else {}), **decoding)
  scaled = cfg.adaptor == "ultravox"
  meta["fresh"] = ("audio token rows = mean of existing rows; adaptor randomly initialised"
                   + ("; its ln_post scale = the RMS of the embedding rows" if scaled else "")
                   + ("; bridge = the LLM's embedding of each Whisper token's text, adaptor filler = that of a "
                      "space" if bridge is not None else ""))
  return done("llasm", cfg, [("llm", llm, lambda t: _with_mean_rows(t, vocab)), ("whisper", whisper, _whisper_stream)],
              keymaps("llasm", mode), extra=_fresh_adaptor(cfg, seed=0), tokenizer=tokenizer, match_text_scale=scaled,
              bridge=bridge, filler=filler)


def _whisper_tokenizer(whisper, path: str):
  tokenizer = whisper.tokenizer()
  if tokenizer is None:
    raise CheckpointError(f"{path}: 'decoder' mode maps Whisper's tokens to the LLM's and needs Whisper's tokenizer")
  return tokenizer


def _decoding(whisper, wcfg, audio_tokens: int | None = None) -> dict[str, Any]:
  """The LlasmConfig fields of Whisper's greedy decoding ("decoder" mode), from its generation config:
  English on a multilingual Whisper (its <|en|> token in the prompt), and `audio_tokens` transcript
  tokens at most (None: 64, about 20 s of speech), within the decoder's positions."""
  from llasm_jax.infer.transcribe import WhisperTokens

  if hasattr(whisper, "generation_config"):
    gen = whisper.generation_config()
  else:
    path = os.path.join(whisper.folder, "generation_config.json")
    if not os.path.exists(path):
      raise CheckpointError(f"{whisper.folder}: no generation_config.json; 'decoder' mode reads Whisper's prompt and "
                            "suppressed tokens from it")
    gen = read_json(path)
  tokens = WhisperTokens.from_generation_config(gen, wcfg)
  prompt = tuple(tokens.prompt(tokens.languages.get("<|en|>")))
  room = wcfg.max_target_positions - len(prompt)
  if audio_tokens is not None and not 2 <= audio_tokens <= room:
    raise UserError(f"--audio-tokens {audio_tokens}: expected 2 (a token and <|endoftext|>) to {room} (this Whisper's "
                     f"{wcfg.max_target_positions} decoder positions less its {len(prompt)}-token prompt)")
  return dict(decoder_prompt=prompt, decoder_eos=tokens.eos, decoder_suppress=tokens.suppress,
              decoder_begin_suppress=tokens.begin_suppress,
              audio_token_len=audio_tokens or min(LlasmConfig.audio_token_len, room))


def bridge_ids(whisper_tokenizer, llm_tokenizer, whisper_vocab: int, first_special: int) -> np.ndarray:
  """int32[whisper_vocab]: for each Whisper token, the LLM token that spells its text, or -1 (the
  specials from `first_special` on, and rows past the tokenizer). A text the LLM spells with several
  tokens takes its first, or the single token of its lower-case text (" Honestly" -> " honestly");
  in the everyday sentences 2 of 338 Whisper tokens are such."""
  out = np.full((whisper_vocab,), -1, np.int32)
  for i in range(min(first_special, len(whisper_tokenizer), whisper_vocab)):
    text = whisper_tokenizer.convert_tokens_to_string([whisper_tokenizer.convert_ids_to_tokens(i)])
    ids = llm_tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > 1:
      lower = llm_tokenizer.encode(text.lower(), add_special_tokens=False)
      ids = lower if len(lower) == 1 else ids
    if ids:
      out[i] = ids[0]
  return out


def _save_files(p: Plan, folder: str) -> None:
  """The files that travel with the parameters (see the module docstring)."""
  if p.tokenizer is not None:
    p.tokenizer.save_pretrained(folder)
  for role, src, _ in p.sources:
    # The source configs travel along, so `export` keeps the fields llasm_jax does not model.
    if role == "llm":
      src.save_tokenizer_files(folder)
      paths.write_json(os.path.join(folder, checkpoint.HF_LLM_CONFIG), src.config)
    else:
      src.save_feature_files(folder)
      os.makedirs(os.path.join(folder, checkpoint.WHISPER_DIR), exist_ok=True)
      src.save_tokenizer_files(os.path.join(folder, checkpoint.WHISPER_DIR))
      paths.write_json(os.path.join(folder, checkpoint.HF_WHISPER_CONFIG), src.config)


def convert(llm_dir: str | None = None, whisper_dir: str | None = None, *, out: str, dtype: str = "float32",
            mode: str = "llasm", adaptor: str | None = None, stack_factor: int | None = None,
            adaptor_hidden: int | None = None, audio_tokens: int | None = None, overwrite: bool = False,
            progress: bool = True, _on_tensor=None) -> Summary:
  """Converts the checkpoints at `llm_dir` / `whisper_dir` (folders, or a GGUF file) into a
  llasm_jax model folder at `out` (see the module docstring for the combinations and formats).
  `adaptor`, `stack_factor`, `adaptor_hidden`: a new "encoder"-mode model's projector, "mlp"
  (default) or "ultravox", its encoder frames per audio token and its inner width; `audio_tokens`
  a new "decoder"-mode model's transcript tokens per audio (see `plan`).

  `_on_tensor(name)` is a test hook, called before each tensor is placed.
  """
  if dtype not in ("float32", "bfloat16"):
    raise UserError(f"--dtype {dtype!r}: expected float32 or bfloat16")
  start = time.perf_counter()
  p = plan(llm_dir, whisper_dir, mode, adaptor, stack_factor, adaptor_hidden, audio_tokens)
  with checkpoint.atomic_dir(out, overwrite=overwrite) as tmp:
    abstract = nnx.eval_shape(lambda: checkpoint.build_model(p.kind, p.cfg, nnx.Rngs(0)))
    shapes = jax.tree.map(lambda v: v.shape, flat_params(abstract))
    np_dtype = jnp.dtype(dtype)
    dest = {k: np.empty(s, np_dtype) for k, s in shapes.items() if k not in p.extra}
    summary = Summary(out=paths.join(out), kind=p.kind)
    total = sum(src.nbytes for _, src, _ in p.sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress)

    def count(name, array):
      if _on_tensor is not None:
        _on_tensor(name)
      summary.tensors += 1
      summary.bytes_read += array.nbytes
      bar.update(array.nbytes)

    filled: dict[str, int] = {}
    for _, src, wrap in p.sources:
      stream = src.tensors() if wrap is None else wrap(src.tensors())
      filled.update(fill_params(dest, stream, list(p.keymaps), on_tensor=count))
    bar.close()
    positions = [k for k in dest if k.endswith("encoder/embed_positions") and k not in filled]
    for k in positions:
      dest[k][...] = sinusoids(*dest[k].shape)
    check_complete(dest, filled, optional=positions + (["bridge"] if p.bridge_ids is not None else []))
    dest.update({k: v.astype(np_dtype) for k, v in p.extra.items()})
    if p.bridge_ids is not None:  # the LLM's rows, audio-token rows appended, now here; specials: zeros
      table = dest["llm/model/embed_tokens/embedding"]
      dest["bridge"] = np.where((p.bridge_ids >= 0)[:, None], table[np.maximum(p.bridge_ids, 0)], 0).astype(np_dtype)
      dest["adaptor/filler"] = np.asarray(table[p.filler_id]).astype(np_dtype)
    if p.match_text_scale:
      # Only now is the LLM's embedding table here (mean rows appended): the Ultravox adaptor's
      # outputs start at the size of its rows.
      dest["adaptor/ln_post/weight"] = np.asarray(
          text_scale(dest["llm/model/embed_tokens/embedding"], p.cfg.llm.vocab_size)).astype(np_dtype)
    with paths.staged(tmp) as local:  # tokenizers save local files only
      _save_files(p, local)
    checkpoint.save_params(tmp, p.kind, p.cfg, dest, stored_dtype=dtype, extra=dict(p.meta))  # its meta file last
    del dest
  summary.seconds = time.perf_counter() - start
  return summary
