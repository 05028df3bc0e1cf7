"""CTranslate2 Whisper folders (what faster-whisper uses) -> Hugging Face Whisper tensors and files, with numpy alone.

A folder holds `model.bin`, `config.json` (suppress / language ids, alignment heads) and
`tokenizer.json` (or only `vocabulary.txt` / `vocabulary.json`). `model.bin`, as CTranslate2's
`ModelSpec._serialize` writes it, little endian; a string is u16 length (with its NUL), the
UTF-8 bytes and a NUL:

  u32 binary version (1..6); from version 2: string spec name, u32 spec revision
  u32 variable count; each: string name, u8 rank, u32[rank] shape,
      u8 dtype id (version >= 4; before it, u8 item size), u32 byte count, the bytes
  u32 alias count (version >= 3); each: string alias, string name it stands for

`CT2Whisper` maps a WhisperSpec onto `WhisperForConditionalGeneration` names: the fused
self-attention q|k|v and cross-attention k|v are split, the zero k-bias slices dropped (Whisper's
k projections have no bias), float16 / bfloat16 widened exactly and int8 / int16 weights scaled
back (their rounding stays). Nothing needs the `ctranslate2` package.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any, Iterator

import numpy as np

from llasm_jax.convert.reader import CheckpointError, MadeTokenizerFiles, read_json

MODEL_FILE = "model.bin"
MAX_BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
MAX_WHISPER_REVISION = 3
# CTranslate2's DataType enum (include/ctranslate2/types.h), then item sizes of binary version < 4.
_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_ITEM_SIZE_DTYPES = {4: "float32", 2: "int16", 1: "int8"}
_GELU = 3  # common_spec.Activation.GELU
# Whisper's special tokens other than languages, in vocabulary order.
_NON_LANGUAGE = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                 "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")
_SPECIAL = re.compile(r"^<\|[^|]+\|>$")
_TIMESTAMP = re.compile(r"^<\|\d+\.\d\d\|>$")


def is_ct2_file(path: str) -> bool:
  """Whether `path` starts like a CTranslate2 `model.bin` (a small version, then a spec name)."""
  try:
    with open(path, "rb") as f:
      head = f.read(6)
  except OSError:
    return False
  if len(head) < 6:
    return False
  version, strlen = struct.unpack("<IH", head)
  return 1 <= version <= MAX_BINARY_VERSION and (version == 1 or 0 < strlen < 256)


class CT2File:
  """The variables of one `model.bin`, indexed once and read on demand from a memory map."""

  def __init__(self, path: str):
    self.path = path
    self._buf = np.memmap(path, np.uint8, mode="r")
    self._pos = 0
    try:
      self._index()
    except (struct.error, IndexError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a readable CTranslate2 model.bin ({e}); the file may be truncated") from None

  def _take(self, fmt: str):
    size = struct.calcsize(fmt)
    if self._pos + size > len(self._buf):
      raise struct.error(f"ends at byte {len(self._buf)}, reading {size} more at {self._pos}")
    out = struct.unpack_from("<" + fmt, self._buf, self._pos)
    self._pos += size
    return out if len(out) > 1 else out[0]

  def _string(self) -> str:
    n = self._take("H")
    raw = bytes(self._buf[self._pos:self._pos + n])
    self._pos += n
    return raw.rstrip(b"\0").decode("utf-8")

  def _index(self) -> None:
    self.version = self._take("I")
    if not 1 <= self.version <= MAX_BINARY_VERSION:
      raise CheckpointError(f"{self.path}: CTranslate2 binary version {self.version}; this reader knows versions "
                            f"1 to {MAX_BINARY_VERSION} (a newer CTranslate2 wrote it?)")
    self.spec, self.revision = (self._string(), self._take("I")) if self.version >= 2 else ("", 1)
    self.variables: dict[str, tuple[tuple[int, ...], str, int]] = {}  # name -> shape, dtype, byte offset
    for _ in range(self._take("I")):
      name = self._string()
      rank = self._take("B")
      shape = tuple(self._take("I") for _ in range(rank)) if rank else ()
      if self.version >= 4:
        type_id, nbytes = self._take("B"), self._take("I")
        if type_id not in _DTYPES:
          raise CheckpointError(f"{self.path}: variable {name!r} has unknown CTranslate2 dtype id {type_id}")
        dtype = _DTYPES[type_id]
      else:
        item, count = self._take("B"), self._take("I")
        if item not in _ITEM_SIZE_DTYPES:
          raise CheckpointError(f"{self.path}: variable {name!r} has item size {item}, which CTranslate2 never wrote")
        dtype, nbytes = _ITEM_SIZE_DTYPES[item], count * item
      if nbytes != int(np.prod(shape, dtype=np.int64)) * _itemsize(dtype):
        raise CheckpointError(f"{self.path}: variable {name!r} holds {nbytes} bytes, not the {dtype}{list(shape)} "
                              "its header states")
      self.variables[name] = (shape, dtype, self._pos)
      self._pos += nbytes
      if self._pos > len(self._buf):
        raise struct.error(f"variable {name!r} runs past the end of the file")
    self.aliases: dict[str, str] = {}
    if self.version >= 3:
      for _ in range(self._take("I")):
        alias = self._string()
        self.aliases[alias] = self._string()

  def __contains__(self, name: str) -> bool:
    return name in self.variables or name in self.aliases

  def resolve(self, name: str) -> str:
    seen = name
    while name in self.aliases:
      name = self.aliases[name]
    if name not in self.variables:
      raise CheckpointError(f"{self.path}: no variable {seen!r} (spec {self.spec} revision {self.revision})")
    return name

  def raw(self, name: str) -> np.ndarray:
    """The stored array, as stored (a read-only view of the file)."""
    shape, dtype, offset = self.variables[self.resolve(name)]
    if dtype == "bfloat16":
      import ml_dtypes

      np_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
      np_dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return self._buf[offset:offset + count * np_dtype.itemsize].view(np_dtype).reshape(shape)

  def scalar(self, name: str, default=None):
    if name not in self:
      return default
    return self.raw(name).item()

  def float32(self, name: str) -> np.ndarray:
    """The variable widened to float32: exact from float16 / bfloat16; int8 / int16 weights are
    divided by their stored `<name>_scale` (per output row, or one number)."""
    array = self.raw(name)
    if array.dtype.kind == "i" and name.endswith("weight"):
      scale_name = f"{name}_scale"
      if scale_name not in self:
        raise CheckpointError(f"{self.path}: {array.dtype} weight {name!r} has no {scale_name!r} to dequantize it")
      scale = self.raw(scale_name).astype(np.float32)
      if scale.ndim == 1:
        scale = scale.reshape((-1,) + (1,) * (array.ndim - 1))
      return array.astype(np.float32) / scale
    return array.astype(np.float32)


def _itemsize(dtype: str) -> int:
  return {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}[dtype]


def _layers(f: CT2File, scope: str) -> int:
  found = {int(m.group(1)) for n in f.variables if (m := re.match(rf"{scope}/layer_(\d+)/", n))}
  if found != set(range(len(found))):
    raise CheckpointError(f"{f.path}: {scope} layers {sorted(found)} are not numbered 0..N-1")
  return len(found)


class CT2Whisper(MadeTokenizerFiles):
  """A CTranslate2 Whisper folder as a conversion source (see the module docstring)."""

  format = "ctranslate2"

  def __init__(self, folder: str):
    self.path = folder
    self.folder = os.path.abspath(folder)
    self.model_file = os.path.join(self.folder, MODEL_FILE)
    if not os.path.exists(self.model_file):
      raise CheckpointError(f"{folder}: no {MODEL_FILE}, so not a CTranslate2 model folder")
    self.file = f = CT2File(self.model_file)
    if f.spec != WHISPER_SPEC:
      raise CheckpointError(f"{folder}: a CTranslate2 {f.spec or 'version-1'} model, not Whisper; only CTranslate2 "
                            f"Whisper folders ({WHISPER_SPEC}, as faster-whisper uses) are accepted")
    if f.revision > MAX_WHISPER_REVISION:
      raise CheckpointError(f"{folder}: {WHISPER_SPEC} revision {f.revision}; this reader knows revisions up to "
                            f"{MAX_WHISPER_REVISION} (a newer CTranslate2 wrote it)")
    ct2_config_path = os.path.join(self.folder, "config.json")
    self.ct2_config = read_json(ct2_config_path) if os.path.exists(ct2_config_path) else {}
    self._check_spec()
    self.tokens = self._vocabulary()
    self.config = self._hf_config()
    self._tokenizer = None

  # ---- architecture ----------------------------------------------------------------------

  def _check_spec(self) -> None:
    f = self.file
    checks = {"decoder/activation": _GELU, "decoder/pre_norm": 1, "decoder/alibi": 0,
              "decoder/start_from_zero_embedding": 0}
    for name, want in checks.items():
      got = f.scalar(name, want)
      if got != want:
        raise CheckpointError(f"{self.path}: {name} = {got}, a Whisper model has {want}; this is not a Whisper "
                              "this converter can read")
    emb, proj = "decoder/embeddings/weight", "decoder/projection/weight"
    if proj in f and f.resolve(proj) != f.resolve(emb) and not np.array_equal(f.raw(proj), f.raw(emb)):
      raise CheckpointError(f"{self.path}: {proj} differs from {emb}; Whisper ties its output projection to the "
                            "token embedding, and an untied one is not supported")
    if "decoder/projection/bias" in f and np.any(f.raw("decoder/projection/bias")):
      raise CheckpointError(f"{self.path}: decoder/projection/bias is not zero; Whisper's output projection "
                            "has no bias")

  def _hf_config(self) -> dict[str, Any]:
    """A `WhisperConfig` dict: sizes from the shapes, heads from the spec's scalars (suppressed
    tokens go to the generation config only: transformers warns when a model config has them)."""
    f = self.file
    d_model, mels, _ = f.raw("encoder/conv1/weight").shape
    vocab = f.raw("decoder/embeddings/weight").shape[0]
    # Files older than the num_heads scalars: every Whisper size has 64-wide heads.
    enc_heads = int(f.scalar("encoder/num_heads", d_model // 64))
    dec_heads = int(f.scalar("decoder/num_heads", d_model // 64))
    ids = self._special_ids()
    return dict(
        architectures=["WhisperForConditionalGeneration"], model_type="whisper", activation_function="gelu",
        num_mel_bins=int(mels), d_model=int(d_model), vocab_size=int(vocab),
        encoder_layers=_layers(f, "encoder"), encoder_attention_heads=enc_heads,
        encoder_ffn_dim=int(f.raw("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_layers=_layers(f, "decoder"), decoder_attention_heads=dec_heads,
        decoder_ffn_dim=int(f.raw("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(f.raw("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(f.raw("decoder/position_encodings/encodings").shape[0]),
        scale_embedding=bool(f.scalar("decoder/scale_embeddings", 0)), tie_word_embeddings=True,
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])

  # ---- tensors ---------------------------------------------------------------------------

  @property
  def nbytes(self) -> int:
    """About the bytes `tensors()` yields (float32), which a progress bar counts."""
    return sum(4 * int(np.prod(shape)) for shape, _, _ in self.file.variables.values() if shape)

  def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
    """(`WhisperForConditionalGeneration` name, float32 array) pairs, one at a time; every
    stored variable is accounted for (a scalar checked above, a tensor mapped, or an error)."""
    f, used = self.file, set()

    def get(name):
      used.add(f.resolve(name))
      if f"{name}_scale" in f:
        used.add(f.resolve(f"{name}_scale"))
      return f.float32(name)

    def linear(ct2, hf):
      yield f"{hf}.weight", get(f"{ct2}/weight")
      if f"{ct2}/bias" in f:
        yield f"{hf}.bias", get(f"{ct2}/bias")

    def norm(ct2, hf):
      yield f"{hf}.weight", get(f"{ct2}/gamma")
      yield f"{hf}.bias", get(f"{ct2}/beta")

    def fused(ct2, hf, projs):
      """One CT2 linear holding several projections stacked on the output axis."""
      weight, bias = get(f"{ct2}/weight"), get(f"{ct2}/bias") if f"{ct2}/bias" in f else None
      d = weight.shape[0] // len(projs)
      for i, proj in enumerate(projs):
        yield f"{hf}.{proj}.weight", weight[i * d:(i + 1) * d]
        if bias is None:
          continue
        part = bias[i * d:(i + 1) * d]
        if proj == "k_proj":  # Whisper's k projection has no bias: CT2 fills zeros
          if np.any(part):
            raise CheckpointError(f"{self.path}: {ct2}/bias holds a non-zero k slice (max |b| "
                                  f"{np.abs(part).max():.3g}); Whisper's k_proj has no bias, so this is not Whisper")
          continue
        yield f"{hf}.{proj}.bias", part

    for part in ("encoder", "decoder"):
      hf = f"model.{part}"
      if part == "encoder":
        for n in (1, 2):
          yield from linear(f"encoder/conv{n}", f"{hf}.conv{n}")
      else:
        yield f"{hf}.embed_tokens.weight", get("decoder/embeddings/weight")
      yield f"{hf}.embed_positions.weight", get(f"{part}/position_encodings/encodings")
      for i in range(self.config[f"{part}_layers"]):
        ct2, layer = f"{part}/layer_{i}", f"{hf}.layers.{i}"
        yield from fused(f"{ct2}/self_attention/linear_0", f"{layer}.self_attn", ("q_proj", "k_proj", "v_proj"))
        yield from linear(f"{ct2}/self_attention/linear_1", f"{layer}.self_attn.out_proj")
        yield from norm(f"{ct2}/self_attention/layer_norm", f"{layer}.self_attn_layer_norm")
        if part == "decoder":
          yield from linear(f"{ct2}/attention/linear_0", f"{layer}.encoder_attn.q_proj")
          yield from fused(f"{ct2}/attention/linear_1", f"{layer}.encoder_attn", ("k_proj", "v_proj"))
          yield from linear(f"{ct2}/attention/linear_2", f"{layer}.encoder_attn.out_proj")
          yield from norm(f"{ct2}/attention/layer_norm", f"{layer}.encoder_attn_layer_norm")
        yield from linear(f"{ct2}/ffn/linear_0", f"{layer}.fc1")
        yield from linear(f"{ct2}/ffn/linear_1", f"{layer}.fc2")
        yield from norm(f"{ct2}/ffn/layer_norm", f"{layer}.final_layer_norm")
      yield from norm(f"{part}/layer_norm", f"{hf}.layer_norm")
    # The output projection is the embedding (checked in _check_spec); scalars are spec facts.
    used.update(f.resolve(n) for n in ("decoder/projection/weight", "decoder/projection/bias") if n in f)
    left = [n for n, (shape, _, _) in f.variables.items() if n not in used and shape != ()]
    if left:
      raise CheckpointError(f"{self.path}: CTranslate2 variables {left[:5]} are not part of the Whisper layout "
                            f"this reader knows ({WHISPER_SPEC} revision {f.revision})")

  # ---- tokenizer and generation facts ----------------------------------------------------

  def _vocabulary(self) -> list[str]:
    """Tokens by id: tokenizer.json's vocabulary and added tokens, else vocabulary.txt / .json."""
    path = os.path.join(self.folder, "tokenizer.json")
    if os.path.exists(path):
      spec = read_json(path)
      table = dict((spec.get("model") or {}).get("vocab") or {})
      table.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
      tokens = [""] * (max(table.values()) + 1)
      for token, i in table.items():
        tokens[i] = token
      return tokens
    for name in ("vocabulary.json", "vocabulary.txt"):
      path = os.path.join(self.folder, name)
      if os.path.exists(path):
        if name.endswith(".json"):
          return list(read_json(path))
        with open(path, encoding="utf-8") as fh:
          return fh.read().split("\n")[:-1] if os.path.getsize(path) else []
    raise CheckpointError(f"{self.path}: no tokenizer.json, vocabulary.txt or vocabulary.json; copy the tokenizer.json "
                          "of the same Whisper size (from its openai/whisper-* folder) next to model.bin")

  def _special_ids(self) -> dict[str, int]:
    ids = {t: i for i, t in enumerate(self.tokens) if _SPECIAL.match(t) and not _TIMESTAMP.match(t)}
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>") if t not in ids]
    if missing:
      raise CheckpointError(f"{self.path}: the vocabulary lacks Whisper's {missing}; the tokenizer does not belong "
                            "to a Whisper model")
    return ids

  def tokenizer(self):
    """A transformers `WhisperTokenizer`: the BPE of tokenizer.json (or, with only a vocabulary
    file, the tokens without merges: decoding is exact, encoding falls back to single bytes),
    Whisper's special tokens, and timestamp tokens up to the model's vocabulary size."""
    if self._tokenizer is not None:
      return self._tokenizer
    import tokenizers
    from transformers import WhisperTokenizer

    path = os.path.join(self.folder, "tokenizer.json")
    special = list(self._special_ids())
    if os.path.exists(path):
      backend = tokenizers.Tokenizer.from_file(path)
    else:
      print(f"note: {self.path} has no tokenizer.json; the tokenizer is rebuilt from its vocabulary without BPE "
            "merges (decoding is exact; encoding text gives byte-level tokens)")
      vocab = {t: i for i, t in enumerate(self.tokens) if t not in special and not _TIMESTAMP.match(t)}
      backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
      backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
      backend.decoder = tokenizers.decoders.ByteLevel()
      backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    # Timestamps <|0.00|> ... fill the ids after the special tokens, as in the openai tokenizers.
    have = backend.get_vocab_size(with_added_tokens=True)
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(self.config["vocab_size"] - have)]
    backend.add_tokens([tokenizers.AddedToken(t, normalized=False) for t in stamps])
    eot = "<|endoftext|>"
    tok = WhisperTokenizer(tokenizer_object=backend, unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot,
                           additional_special_tokens=[t for t in special if t != eot])
    if len(tok) != self.config["vocab_size"]:
      raise CheckpointError(f"{self.path}: the tokenizer has {len(tok)} tokens, the model {self.config['vocab_size']}")
    self._tokenizer = tok
    return tok

  def generation_config(self) -> dict[str, Any]:
    """What `WhisperForConditionalGeneration.generate` reads, from the vocabulary and CT2's config.json."""
    ids = self._special_ids()
    c = self.config
    multilingual = c["vocab_size"] >= 51865  # as openai-whisper decides
    out = dict(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"], max_length=c["max_target_positions"],
        is_multilingual=multilingual, max_initial_timestamp_index=50, return_timestamps=False)
    if "<|startofprev|>" in ids:
      out["prev_sot_token_id"] = ids["<|startofprev|>"]
    for key, ct2_key in (("suppress_tokens", "suppress_ids"), ("begin_suppress_tokens", "suppress_ids_begin"),
                         ("alignment_heads", "alignment_heads")):
      if self.ct2_config.get(ct2_key) is not None:
        out[key] = self.ct2_config[ct2_key]
    if multilingual:
      out["lang_to_id"] = {t: i for t, i in ids.items() if t not in _NON_LANGUAGE}
      out["task_to_id"] = {task: ids[f"<|{task}|>"] for task in ("transcribe", "translate") if f"<|{task}|>" in ids}
    return out

  def save_feature_files(self, dst: str) -> None:
    """Writes `preprocessor_config.json`: `WhisperFeatureExtractor` for this model's mel bins."""
    from transformers import WhisperFeatureExtractor

    if not os.path.exists(os.path.join(dst, "preprocessor_config.json")):
      WhisperFeatureExtractor(feature_size=self.config["num_mel_bins"]).save_pretrained(dst)
