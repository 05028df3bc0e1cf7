"""grain input pipeline: built datasets (or synthetic ones) -> host batches in the training contract.

Legend: B per-host batch, T tokens (a length bucket), A audio slots per sample, M mel bins,
F mel frames (3000 in "llasm" mode, `mel_frames` in "encoder" mode), S cached feature frames
(a feature bucket), E Whisper width.

The batch contract (what llasm_jax/train consumes; names and dtypes are fixed):
  input_ids      int32[B, T]        right-padded with `pad_id`
  labels         int32[B, T]        -100 where there is no loss (unshifted, HF convention)
  attention_mask int32[B, T]        1 = real token
  positions      int32[B, T]        0..T-1 (right padding: positions of real tokens are 0..n-1)
  prefix_ids     int32[P]           with `shared_prefix` only: the template's fixed opening, which
                                    every row starts with; the rows above then hold what follows
                                    it, and their positions start at P
  target_positions int32[B, K]      per row, the positions whose next token is a target, in order,
                                    -1 padded (`target_positions`): the LM head runs there only;
                                    K = T with fixed shapes, else a power of two >= the most targets
  segment_ids    int32[B, T]        with `packing` only: rows hold several samples (1..n, 0 =
                                    padding; see llasm_jax/data/packing.py), positions restart
                                    per sample, and A is a budget of audio slots per row
and the audio, as log-mel from a built dataset (`features="mel"`):
  mel            float32[B, A, M, F] Whisper log-mel per audio slot, zero-padded, empty slots zero
  mel_lengths    int32[B, A]        valid mel frames per slot (3000 in "llasm" mode), 0 = empty
                                    slot; filled slots first
or as frozen-Whisper outputs from a dataset of `llasm-jax data encode` (`features="cached"`,
see llasm_jax/data/encode.py; no mel and no Whisper work in the step):
  audio_features        float32|bfloat16[B, A, S, E]  `Llasm.encode_audio` outputs per slot, in
                        the cache's dtype, zero past each length; S = audio_token_len ("llasm"
                        mode) or the smallest feature bucket holding the batch ("encoder" mode)
  audio_feature_lengths int32[B, A]  valid frames per slot, 0 = empty slot; filled slots first
In both, the audio token counts of the text come from `audio_tokens(mel frames)`; a cached
dataset stores each slot's mel frame count for that.
With a distillation teacher (`teacher=True`: config.train.loss "kd" or "mix"), also the same
conversation as the frozen LLM reads it as text, each `<audio>` replaced by the text it speaks
(`Featurize.teacher_messages`) and no audio tokens, Tt bucketed like T:
  teacher_input_ids, teacher_attention_mask, teacher_positions  int32[B, Tt]  as their student twins
  teacher_target_positions int32[B, K]  slot i predicts the same answer token as slot i of
                                    target_positions; -1 where either sequence lost it to a cut,
                                    and in rows whose audio has no known text
With CTC (`ctc=True`: config.train.loss "ctc" or ctc_weight > 0), also what the row's audios say, in
the LLM's own tokens (`ctc_token_ids`), the transcripts of its audios back to back in order:
  ctc_labels       int32[B, U]      0-padded; U = `ctc_width` (every frame of a row's slots) with
                                    fixed shapes, else a power of two >= the longest
  ctc_label_lengths int32[B]        0 = none (no audio, an audio without known text, or one cut
                                    partway); may exceed U (labels cut: more than the frames hold)

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

import dataclasses
import glob
import logging
import os
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from llasm_jax import paths
from llasm_jax.config import needs_ctc, needs_teacher
from llasm_jax.data import features, packing, prompts, templates
from llasm_jax.data.audio import SAMPLE_RATE, from_int16
from llasm_jax.data.features import MAX_FRAMES
from llasm_jax.models.llasm import LlasmConfig, check_audio_markers
from llasm_jax.models.whisper import encoder_frames
from llasm_jax.errors import UserError
from llasm_jax.tokens import IGNORE, LOAD_LOCK, load_tokenizer

MIXED = "mixed"  # a Source over asr and instructions datasets together
KIND_KEY = "_kind"  # a mixed Source's records: the kind of the dataset each came from
FEATURES = ("mel", "cached")  # what a batch carries of the audio (see the contract above)
AUDIO_KEYS = {"mel": ("mel", "mel_lengths"), "cached": ("audio_features", "audio_feature_lengths")}
TEXT_KEYS = ("input_ids", "labels", "attention_mask", "positions", "target_positions")
PACKED_KEYS = ("segment_ids",)  # what packed batches carry more
TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_positions", "teacher_target_positions")
CTC_KEYS = ("ctc_labels", "ctc_label_lengths")
BATCH_KEYS = TEXT_KEYS + AUDIO_KEYS["mel"]
BATCH_AXES = {"input_ids": ("batch", "length"), "labels": ("batch", "length"),
              "attention_mask": ("batch", "length"), "positions": ("batch", "length"),
              "target_positions": ("batch", None), "mel": ("batch", None, None, None), "mel_lengths": ("batch", None),
              "audio_features": ("batch", None, None, None), "audio_feature_lengths": ("batch", None),
              "teacher_input_ids": ("batch", "length"), "teacher_attention_mask": ("batch", "length"),
              "teacher_positions": ("batch", "length"), "teacher_target_positions": ("batch", None),
              "prefix_ids": (None,), "segment_ids": ("batch", "length"),
              "ctc_labels": ("batch", None), "ctc_label_lengths": ("batch",)}
NO_TRANSCRIPTS = ("holds no `transcripts` (what each audio says), which the distillation teacher reads: it was "
                  "built before they were stored. Build it again with `llasm-jax data build instructions` (and "
                  "`data encode` it again if cached), or set config.train.loss='ce'")


def target_positions(labels: np.ndarray, k: int | None = None) -> np.ndarray:
  """labels int[B, T] -> int32[B, K]: per row, in order, the positions t whose next token
  labels[t + 1] is a target; -1 pads. The loss runs the LM head on these K positions only
  (in stage 1 about one position in eight carries a loss). K: `k`, else the most targets of
  any row rounded up to a power of two (at least 8, at most T), so few shapes compile."""
  b, t = labels.shape
  has = labels[:, 1:] != IGNORE
  most = int(has.sum(axis=1).max(initial=0))
  if k is None:
    k = min(t, max(8, 1 << max(most - 1, 0).bit_length()))
  if k < most:
    raise UserError(f"target_positions: a row has {most} targets, more than k={k}")
  out = np.full((b, k), -1, np.int32)
  for i, row in enumerate(has):
    pos = np.flatnonzero(row)
    out[i, :len(pos)] = pos
  return out


def batch_keys(features: str = "mel", teacher: bool = False, prefix: bool = False,
               packed: bool = False, ctc: bool = False) -> tuple[str, ...]:
  """The keys of a batch whose audio comes as `features` ("mel" or "cached"), with the
  distillation teacher's text sequences or not, with a shared prefix (prefix_ids) or not, of
  packed rows (segment_ids) or not, with CTC targets or not."""
  if features not in FEATURES:
    raise UserError(f"features {features!r}: expected one of {FEATURES}")
  return (TEXT_KEYS + AUDIO_KEYS[features] + (TEACHER_KEYS if teacher else ()) + (("prefix_ids",) if prefix else ())
          + (PACKED_KEYS if packed else ()) + (CTC_KEYS if ctc else ()))


def ctc_token_ids(tok, text: str) -> list[int]:
  """`text` in the tokens it has in the middle of a sentence (after a word and a space), as the
  LLM reads it in a prompt or an answer: with the space that BPE vocabularies (GPT-2 / SmolLM2 'Ġ')
  fold into the first word, and no second one where SentencePiece adds its own ('▁'). The
  anchor's tokens are cut off; where they merge with the text, the text alone is tokenized."""
  anchor = tok.encode("a", add_special_tokens=False)
  ids = tok.encode("a " + text.strip(), add_special_tokens=False)
  if ids[:len(anchor)] == anchor:
    return ids[len(anchor):]
  return tok.encode(text.strip(), add_special_tokens=False)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What a sample becomes. `buckets`: allowed T values (ascending); None = always `seq_len`.
  `system`: the system prompt; None = the template's default (`templates.LLASM_SYSTEM` for the
  LLaSM templates, the chat template's own for "chat-template"), "" = none (an empty one in the
  LLaSM templates, the chat template's own default in "chat-template")."""

  mode: str = "llasm"
  num_mel_bins: int = 80
  mel_frames: int = features.MAX_FRAMES  # "encoder" mode: F, and the window length in frames
  audio_token_len: int = 64
  stack_factor: int = 8
  audio_patch_id: int = 32000
  audio_start_id: int = 32001
  audio_end_id: int = 32002
  seq_len: int = 512
  buckets: tuple[int, ...] | None = None
  max_audios: int = 1
  template: str = "llasm-cllama2"
  system: str | None = None
  pad_id: int | None = None  # None: the tokenizer's pad, else its eos
  features: str = "mel"  # "mel": log-mel of raw audio; "cached": a `data encode` dataset's features
  # "cached", "encoder" mode: allowed S values (ascending, ending at `feature_frames`); None = quarters.
  feature_buckets: tuple[int, ...] | None = None
  teacher: bool = False  # also the distillation teacher's text sequences (the TEACHER_KEYS)
  ctc: bool = False  # also each row's transcript tokens for the CTC loss (the CTC_KEYS)
  # The template's fixed opening (`Template.fixed_prefix`) once per batch as prefix_ids, the rows
  # starting after it: training runs it once instead of once per row.
  shared_prefix: bool = False
  # Several samples per row (llasm_jax/data/packing.py): windows of `pack_window` samples packed
  # first-fit decreasing into rows of seq_len tokens and max_audios audio slots in all.
  packing: bool = False
  pack_window: int = 128

  @classmethod
  def from_model(cls, cfg: LlasmConfig, **kw) -> "PipelineConfig":
    return cls(mode=cfg.mode, num_mel_bins=cfg.audio.num_mel_bins, audio_token_len=cfg.audio_token_len,
               stack_factor=cfg.stack_factor, audio_patch_id=cfg.audio_patch_id,
               audio_start_id=cfg.audio_start_id, audio_end_id=cfg.audio_end_id, **kw)

  def __post_init__(self):
    if self.mode not in features.MODES:
      raise UserError(f"mode {self.mode!r}: expected one of {features.MODES}")
    if self.mode != "llasm" and not 0 < self.mel_frames <= features.MAX_FRAMES:
      raise UserError(f"mel_frames {self.mel_frames}: {self.mode} mode takes 1..{features.MAX_FRAMES} frames (30 s)")
    if self.mode == "decoder" and self.mel_frames * features.HOP < features.DECODER_MIN_SAMPLES:
      raise UserError(f"mel_frames {self.mel_frames}: decoder mode pads every audio to "
                       f"{features.DECODER_MIN_SAMPLES // features.HOP} frames at least (Whisper's decoder loops on "
                       "less); use windows of that many frames or more")
    if self.buckets is not None:
      b = tuple(self.buckets)
      if not b or list(b) != sorted(set(b)) or b[-1] != self.seq_len:
        raise UserError(f"buckets {b}: expected ascending lengths ending at seq_len {self.seq_len}")
    if self.max_audios < 1:
      raise UserError(f"max_audios {self.max_audios}: need at least one audio slot")
    if self.template not in templates.TEMPLATES:
      raise UserError(f"template {self.template!r}: training and eval take one of {', '.join(templates.TEMPLATES)}")
    if self.packing and self.pack_window < 1:
      raise UserError(f"pack_window {self.pack_window}: packing needs a window of at least one sample")
    if self.packing and self.teacher:
      raise UserError("config.data.packing does not pack the distillation teacher's sequences; set "
                       "config.train.loss='ce' or config.data.packing=False")
    if self.packing and self.ctc:
      raise UserError("config.data.packing does not pack CTC targets (loss 'ctc' or ctc_weight > 0); set "
                       "config.data.packing=False for the CTC stage, or train it without CTC")
    if self.features not in FEATURES:
      raise UserError(f"features {self.features!r}: expected one of {FEATURES}")
    if self.feature_buckets is not None:
      b = tuple(self.feature_buckets)
      if not b or list(b) != sorted(set(b)) or b[0] < 1 or b[-1] != self.feature_frames:
        raise UserError(f"feature_buckets {b}: expected ascending frame counts ending at {self.feature_frames} "
                         f"(the encoder frames of a {self.mel_frames}-frame window)")

  @property
  def frames(self) -> int:
    """F of the batch."""
    return features.MAX_FRAMES if self.mode == "llasm" else self.mel_frames

  @property
  def feature_frames(self) -> int:
    """The largest S of a cached batch: the decoder queries or transcript tokens, or the encoder
    frames of one window."""
    return LlasmConfig.feature_frames(self, self.mel_frames)  # type: ignore[arg-type]

  def feature_bucket(self, frames: int) -> int:
    """S of a cached batch whose longest slot has `frames` feature frames."""
    if self.mode != "encoder":
      return self.audio_token_len
    for b in self.feature_buckets or default_feature_buckets(self.feature_frames):
      if frames <= b:
        return b
    raise UserError(f"a cached audio slot of {frames} feature frames is longer than one {self.mel_frames}-frame "
                     "window; the dataset was encoded with longer windows than config.data.mel_frames")

  @property
  def ctc_width(self) -> int:
    """U of fixed-shape CTC targets: the adaptor frames of a row's full slots; a longer
    transcript cannot align (CTC emits at most one token per frame)."""
    return self.max_audios * self.audio_tokens(self.frames)

  @property
  def fixed_shapes(self) -> bool:
    """Whether every batch has the same shapes (else a step compiles once per bucket combination)."""
    return self.buckets is None and (self.features == "mel" or self.mode != "encoder")

  def audio_tokens(self, mel_frames: int) -> int:
    """P of one slot: the model config's rule (`LlasmConfig.audio_tokens` reads only mode,
    audio_token_len and stack_factor, which this config has too)."""
    return LlasmConfig.audio_tokens(self, mel_frames)  # type: ignore[arg-type]

  def bucket(self, length: int) -> int:
    for b in self.buckets or (self.seq_len,):
      if length <= b:
        return b
    return self.seq_len


def default_feature_buckets(frames: int) -> tuple[int, ...]:
  """Quarters of a window's feature frames, rounded up to multiples of 8 (stack factors divide
  them): few shapes to compile, and a 5 s clip in 30 s windows pays for 7.5 s, not 30."""
  out = sorted({min(frames, -(-frames * q // 4 // 8) * 8) for q in (1, 2, 3, 4)})
  return tuple(out)

# ---------------------------------------------------------------------------------------------
# Sources: random access to records as the builders store them.


def find_dataset(path: str) -> str:
  """The folder holding dataset_info.json: `path` itself, or DIR/<name>/<version> under it."""
  paths.require_local(path, "data dir", "datasets are read through the bucket mounted with gcsfuse, as grain "
                      "recommends (`launch/tpu.sh setup --data-bucket BUCKET` mounts it at /mnt/data): pass the "
                      "mounted folder")
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(glob.glob(os.path.join(path, "*", "dataset_info.json")) +
                 glob.glob(os.path.join(path, "*", "*", "dataset_info.json")))
  if len(found) != 1:
    what = "no dataset" if not found else f"{len(found)} datasets"
    raise FileNotFoundError(f"data dir {path!r}: {what} (dataset_info.json) found; pass the folder that "
                            "`llasm-jax data build` wrote (--out) or its <name>/<version> folder")
  return os.path.dirname(found[0])


class Source:
  """Random access over one or more built datasets: of one kind ("asr" or "instructions"), or of
  both ("mixed": stage 1 on transcripts and spoken instructions together; each record then
  carries its dataset's kind under KIND_KEY)."""

  def __init__(self, paths: str | Sequence[str]):
    import tensorflow_datasets as tfds

    if isinstance(paths, str):
      paths = [p for p in paths.split(",") if p]
    self.paths = [find_dataset(p) for p in paths]
    self.parts, self.part_kinds, caches = [], [], []
    for p in self.paths:
      builder = tfds.builder_from_directory(p)
      metadata = builder.info.metadata or {}
      self.part_kinds.append(metadata.get("kind"))
      caches.append(metadata.get("cache"))
      self.parts.append(builder.as_data_source("train"))
    kinds = set(self.part_kinds)
    if not kinds or not kinds <= {"asr", "instructions"}:
      raise UserError(f"datasets {self.paths}: unknown kinds {sorted(map(str, kinds))}; give datasets of "
                       "`llasm-jax data build` (asr or instructions) or `data encode`")
    self.kind = kinds.pop() if len(kinds) == 1 else MIXED
    # The `data encode` marker (what made the cached features), None for raw audio datasets.
    self.cache = caches[0]
    if any(features_identity(c) != features_identity(self.cache) for c in caches):
      raise UserError(f"datasets {self.paths}: some hold raw audio and some cached features, or features of "
                       "different Whisper models; encode every dataset with the same `llasm-jax data encode --ckpt`")
    self.offsets = np.cumsum([0] + [len(s) for s in self.parts])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    part = int(np.searchsorted(self.offsets, index, side="right")) - 1
    record = self.parts[part][int(index - self.offsets[part])]
    return {**record, KIND_KEY: self.part_kinds[part]} if self.kind == MIXED else record

  def __repr__(self):
    return f"Source({self.paths}, kind={self.kind!r}, len={len(self)})"


_WORDS = ("the weather model speech hello world one two three four five paris please what is this "
          "audio language helpful assistant tell me about a short story").split()


class SyntheticSource:
  """Deterministic records in the builders' format (speech-like audio, word-salad text), for
  tests and benchmarks. kind "asr": one clip each; "instructions": 1..max_turns spoken turns."""

  def __init__(self, kind: str = "asr", size: int = 64, seed: int = 0, seconds: tuple[float, float] = (1.0, 6.0),
               max_turns: int = 2):
    if kind not in ("asr", "instructions"):
      raise UserError(f"kind {kind!r}: expected 'asr' or 'instructions'")
    self.kind, self.size, self.seed, self.seconds, self.max_turns = kind, size, seed, seconds, max_turns

  def __len__(self) -> int:
    return self.size

  def _clip(self, rng) -> np.ndarray:
    n = int(rng.uniform(*self.seconds) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 100 + 80 * rng.random() + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = np.clip(np.sin(2 * np.pi * (3 + rng.random()) * t), 0, None) ** 2
    x = 0.3 * voiced * env + 0.01 * rng.standard_normal(n)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)

  def _text(self, rng) -> str:
    return " ".join(rng.choice(_WORDS, int(rng.integers(2, 10))))

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index) % self.size
    rng = np.random.default_rng([self.seed, index])
    if self.kind == "asr":
      return {"id": f"syn{index}".encode(), "audio": self._clip(rng), "text": self._text(rng).encode(),
              "language": b"en", "source": b"synthetic"}
    turns = int(rng.integers(1, self.max_turns + 1))
    clips = [self._clip(rng) for _ in range(turns)]
    values = []
    for _ in range(turns):
      values += [templates.AUDIO.encode(), self._text(rng).encode()]
    transcripts = [self._text(rng).encode() for _ in range(turns)]  # drawn last: the other fields stay as they were
    return {"id": f"syn{index}".encode(), "roles": np.tile(np.int32([0, 1]), turns), "values": values,
            "transcripts": transcripts, "audio": np.concatenate(clips), "audio_lengths": np.int32([len(c) for c in clips]),
            "language": b"en", "source": b"synthetic"}


def _str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------------------------------------
# Per-sample transform and batching (run in the grain workers; picklable, state built lazily).


def record_kind(record: dict[str, Any], kind: str) -> str:
  """"asr" or "instructions": the record's own (from a mixed Source), else its source's `kind`."""
  return record.get(KIND_KEY, kind)


def record_audios(record: dict[str, Any], kind: str) -> list[np.ndarray]:
  """The audios of a built record ("asr": one; "instructions": one per `<audio>`), float32[N] each."""
  audio = from_int16(record["audio"])
  if record_kind(record, kind) == "asr":
    return [audio]
  bounds = np.cumsum([0] + [int(n) for n in record["audio_lengths"]])
  return [audio[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def audio_slots(audios: Sequence[np.ndarray], cfg: PipelineConfig) -> tuple[list[int], list[np.ndarray]]:
  """Audios -> slots: windows per audio and the log-mel float32[M, F_j] of each slot
  (`prompts.AudioPrompts.windows`: one slot per audio in "llasm" mode, one per `mel_frames`
  window in "encoder" mode). `data encode` calls this too, so cached slots are these slots."""
  owner = prompts.AudioPrompts.of(cfg)
  per_audio = [owner.windows(a) for a in audios]
  return [len(w) for w in per_audio], [m for w in per_audio for m in w]


class Featurize:
  """record (+ rng) -> one sample: input_ids/labels int32[n] and the audio slots kept, as
  mel float32[a, M, F] + mel_lengths int32[a], or (cached datasets) audio_features [sum of S_j, E]
  + audio_feature_lengths int32[a] (the slots' features back to back, unpadded); with
  `cfg.teacher` also teacher_input_ids/teacher_labels int32[m] (m = 0: no teacher for this record)."""

  def __init__(self, cfg: PipelineConfig, tokenizer, kind: str):
    self.cfg, self.tokenizer, self.kind = cfg, tokenizer, kind
    self.audio = prompts.AudioPrompts.of(cfg)  # audio -> windows -> marker spans
    self._template = None
    self._prefix = None
    self._truncated = 0
    self._untaught = 0

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_template"] = None  # rebuilt in each worker
    return state

  @property
  def template(self) -> templates.Template:
    if self._template is None:
      tok = load_tokenizer(self.tokenizer)
      with LOAD_LOCK:
        templates.check_tokenizer_markers(tok, {templates.AU_PATCH: self.cfg.audio_patch_id,
                                                templates.AU_START: self.cfg.audio_start_id,
                                                templates.AU_END: self.cfg.audio_end_id})
        self._template = templates.get_template(self.cfg.template, tok, self.cfg.system)
    return self._template

  def messages(self, record: dict[str, Any], rng: np.random.Generator) -> list[dict]:
    """The conversation, with `<audio>` placeholders."""
    if record_kind(record, self.kind) == "asr":
      return templates.asr_messages(_str(record["text"]), _str(record["language"]), rng)
    roles = ("user", "assistant")
    return [{"role": roles[int(r)], "content": _str(v)} for r, v in zip(record["roles"], record["values"])]

  def spoken(self, record: dict[str, Any]) -> list[str]:
    """What each audio of `record` says, in order (ASR: the transcript; instructions: the
    record's `transcripts`); "" where unknown."""
    if record_kind(record, self.kind) == "asr":
      return [_str(record["text"])]
    if "transcripts" not in record:
      raise UserError(f"record {_str(record.get('id', '?'))!r}: the dataset {NO_TRANSCRIPTS}")
    return [_str(t) for t in record["transcripts"]]

  def ctc_labels(self, record: dict[str, Any], windows: Sequence[int], kept: int) -> np.ndarray:
    """int32[u]: the transcripts of the audios whose `windows` (slots per audio) the sample
    keeps in its first `kept` slots, back to back in the LLM's tokens; empty when an audio among
    them has no known text or is kept only in part (its frames would have no text)."""
    bounds = np.cumsum([0] + list(windows))
    if kept not in bounds:
      return np.zeros(0, np.int32)
    texts = self.spoken(record)[:int(np.searchsorted(bounds, kept))]
    if not all(t.strip() for t in texts):
      return np.zeros(0, np.int32)
    tok = self.template.tokenizer
    return np.int32([i for t in texts for i in ctc_token_ids(tok, t)]).reshape(-1)

  def teacher_messages(self, record: dict[str, Any], msgs: list[dict]) -> list[dict] | None:
    """`msgs` as the distillation teacher reads them: each `<audio>` replaced by the text that
    audio speaks (`spoken`). None when an audio's text is unknown (an empty transcript)."""
    spoken = self.spoken(record)
    holders = sum(m["content"].count(templates.AUDIO) for m in msgs)
    if holders != len(spoken):
      raise UserError(f"record {_str(record.get('id', '?'))!r}: {len(spoken)} transcripts for {holders} "
                       f"{templates.AUDIO!r} placeholders; build the dataset again with `llasm-jax data build`")
    if not all(spoken):
      return None
    return _fill_placeholders(msgs, spoken)

  def _teacher(self, record: dict[str, Any], msgs: list[dict] | None, ids: np.ndarray,
               labels: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher's ids/labels int32[m], cut at seq_len; checks its answer tokens are the student's."""
    if msgs is None:
      self._untaught += 1
      if self._untaught <= 5 or self._untaught % 1000 == 0:
        log.warning("record %r: an audio has no known text (an explicit <audio> placeholder), so the "
                    "distillation teacher skips it; %d such records so far in this process",
                    _str(record.get("id", "?")), self._untaught)
      empty = np.zeros(0, np.int32)
      return {"teacher_input_ids": empty, "teacher_labels": empty}
    t_ids, t_labels = self.template.encode(msgs, [])
    if not np.array_equal(ids[labels != IGNORE], t_ids[t_labels != IGNORE]):
      raise UserError(f"record {_str(record.get('id', '?'))!r}: the distillation teacher's answer tokens differ "
                       f"from the student's under template {self.cfg.template!r} (the text before the answer "
                       "changes how it tokenizes); use the llasm-cllama2 template or config.train.loss='ce'")
    n = self.cfg.seq_len
    return {"teacher_input_ids": t_ids[:n], "teacher_labels": t_labels[:n]}

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    cfg = self.cfg
    msgs = self.messages(record, rng)
    teacher_msgs = self.teacher_messages(record, msgs) if cfg.teacher else None
    if cfg.features == "cached":
      # What `audio_slots` gave when the dataset was encoded: windows per audio, mel frames per slot.
      frames = record["mel_lengths"].tolist()
      windows = record["slots"].tolist()
      ids, labels = self.audio.encode_windows(self.template, msgs, windows, frames)
    else:
      windows, mels = audio_slots(record_audios(record, self.kind), cfg)  # what `self.audio.encode` does
      frames = [m.shape[1] for m in mels]
      ids, labels = self.audio.encode_windows(self.template, msgs, windows, frames)
    extra = self._teacher(record, teacher_msgs, ids, labels) if cfg.teacher else {}
    ids, labels, kept = self._fit(ids, labels)
    if cfg.ctc:
      extra["ctc_labels"] = self.ctc_labels(record, windows, kept)
    if cfg.shared_prefix:
      ids, labels, extra["prefix_ids"] = self._strip_prefix(ids, labels)
    if cfg.features == "cached":
      lengths = record["feature_lengths"][:kept].astype(np.int32)
      return {"input_ids": ids, "labels": labels, "audio_features": record["features"][:int(lengths.sum())],
              "audio_feature_lengths": lengths, **extra}
    mel = np.zeros((kept, cfg.num_mel_bins, cfg.frames), np.float32)
    for j in range(kept):
      mel[j, :, :frames[j]] = mels[j]
    return {"input_ids": ids, "labels": labels, "mel": mel, "mel_lengths": np.int32(frames[:kept]), **extra}

  def _strip_prefix(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels) after the template's fixed prefix, and the prefix int32[P]."""
    if self._prefix is None:
      self._prefix = np.asarray(self.template.fixed_prefix(), np.int32)
    p = len(self._prefix)
    # The first token after the prefix must not be a target: its prediction is made inside the prefix.
    if len(ids) <= p or not np.array_equal(ids[:p], self._prefix) or (labels[:p + 1] != IGNORE).any():
      raise UserError(f"config.data.shared_prefix: a sample does not start with the template's fixed prefix of "
                       f"{p} tokens followed by a prompt token; set config.data.shared_prefix=False for the "
                       f"{self.cfg.template!r} template")
    return ids[p:], labels[p:], self._prefix

  def _fit(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    cfg = self.cfg
    spans = templates.audio_spans(ids, cfg.audio_start_id, cfg.audio_end_id)
    kept = 0
    while kept < len(spans) and kept < cfg.max_audios and spans[kept][1] <= cfg.seq_len:
      kept += 1
    cut = min(cfg.seq_len, spans[kept][0] if kept < len(spans) else len(ids))
    if cut < len(ids):
      self._truncated += 1
      if self._truncated <= 5 or self._truncated % 1000 == 0:
        log.warning("sample of %d tokens and %d audios cut to %d tokens and %d audios (seq_len %d, "
                    "max_audios %d; %d cut so far in this process)", len(ids), len(spans), cut, kept,
                    cfg.seq_len, cfg.max_audios, self._truncated)
    return ids[:cut], labels[:cut], kept


def _fill_placeholders(msgs: list[dict], fills: Sequence[str]) -> list[dict]:
  """`msgs` with the k-th `<audio>` of the conversation replaced by fills[k]."""
  out, k = [], 0
  for m in msgs:
    parts = m["content"].split(templates.AUDIO)
    text = parts[0]
    for part in parts[1:]:
      text += fills[k] + part
      k += 1
    out.append({**m, "content": text})
  return out


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
    b, k = student_slots.shape
    t = self.cfg.bucket(max(1, max(len(s["teacher_input_ids"]) for s in samples)))
    ids, labels = np.full((b, t), self.pad_id, np.int32), np.full((b, t), IGNORE, np.int32)
    mask = np.zeros((b, t), np.int32)
    for i, s in enumerate(samples):
      n = len(s["teacher_input_ids"])
      ids[i, :n], labels[i, :n], mask[i, :n] = s["teacher_input_ids"], s["teacher_labels"], 1
    every = target_positions(labels, t)
    slots = np.full((b, k), -1, np.int32)
    for i in range(b):
      n = min(int(np.sum(every[i] >= 0)), int(np.sum(student_slots[i] >= 0)))
      slots[i, :n] = every[i, :n]
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


# ---------------------------------------------------------------------------------------------
# The dataset.


def _check_transcripts(source, kind: str) -> None:
  """Raises if an instructions dataset of `source` predates the `transcripts` field (its first record)."""
  parts = list(zip(source.parts, source.part_kinds)) if kind == MIXED else [(source, kind)]
  for part, part_kind in parts:
    if part_kind == "instructions" and len(part) and "transcripts" not in part[0]:
      raise UserError(f"{source} {NO_TRANSCRIPTS}")


def batched_dataset(source, cfg: PipelineConfig, tokenizer, *, batch_size: int, seed: int = 0,
                    num_epochs: int | None = None, shard_index: int | None = None, shard_count: int | None = None,
                    drop_shard_remainder: bool = True):
  """A grain MapDataset whose element k is host batch k (see the module docstring for the contract);
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
    _check_transcripts(source, kind)

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


def resolve_features(features: str, source) -> str:
  """config.data.features ("auto", "mel" or "cached") -> what `source` can give ("mel" or "cached")."""
  cached = getattr(source, "cache", None) is not None
  if features == "auto":
    return "cached" if cached else "mel"
  if features not in FEATURES:
    raise UserError(f"config.data.features {features!r}: expected 'auto', 'mel' or 'cached'")
  if features == "cached" and not cached:
    raise UserError(f"config.data.features is 'cached' but {source} holds raw audio; cache its Whisper outputs "
                     "first (llasm-jax data encode --ckpt MODEL --data RAW --out DIR) and train on DIR")
  if features == "mel" and cached:
    raise UserError(f"config.data.features is 'mel' but {source} holds cached Whisper features and no audio; "
                     "set config.data.features to 'cached' (or 'auto'), or train on the raw dataset")
  return features


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


# ---------------------------------------------------------------------------------------------
# Cached features: the marker a `data encode` dataset carries in its metadata, and its check.


CACHE_FORMAT = 1
CACHE_PROVENANCE = ("checkpoint", "source")  # where a cache's marker says it came from, not what it holds


def features_identity(marker: dict[str, Any] | None) -> dict[str, Any] | None:
  """What a cache's features are (mode, windows, dtype, Whisper), its provenance left out: caches
  of different datasets by the same Whisper train together."""
  return None if marker is None else {k: v for k, v in marker.items() if k not in CACHE_PROVENANCE}


def cache_marker(cfg: LlasmConfig, *, mel_frames: int, dtype: str, whisper_fingerprint: str,
                 **info) -> dict[str, Any]:
  """What made a cache, as `data encode` stores it: everything the features depend on."""
  w = cfg.audio
  marker = {"format": CACHE_FORMAT, "mode": cfg.mode, "num_mel_bins": w.num_mel_bins, "feature_dim": cfg.feature_dim,
            "mel_frames": MAX_FRAMES if cfg.padded_mel else int(mel_frames), "dtype": dtype,
            "whisper": {"fingerprint": whisper_fingerprint, "d_model": w.d_model,
                        "encoder_layers": w.encoder_layers, "compute_dtype": w.dtype}}
  marker.update(_decoder_facts(cfg))
  if cfg.with_decoder:
    marker["whisper"]["decoder_layers"] = w.decoder_layers
  return {**marker, **info}


def _decoder_facts(cfg: LlasmConfig) -> dict[str, Any]:
  """What the features of the modes that run Whisper's decoder depend on besides its weights."""
  if cfg.mode == "llasm":
    return dict(audio_token_len=cfg.audio_token_len, decoder_start_token_id=cfg.audio.decoder_start_token_id)
  if cfg.mode == "decoder":
    return dict(audio_token_len=cfg.audio_token_len, decoder_prompt=list(cfg.decoder_prompt),
                decoder_suppress=list(cfg.decoder_suppress), decoder_begin_suppress=list(cfg.decoder_begin_suppress))
  return {}


def check_cache(marker: dict[str, Any], cfg: LlasmConfig, *, mel_frames: int, whisper_fingerprint: str | None = None,
                where: str = "the cached dataset") -> None:
  """Raises if the features of `marker` are not what the model `cfg` (with `mel_frames` windows,
  and Whisper weights of `whisper_fingerprint`, when given) would compute itself."""
  fix = ("encode the raw dataset again with the model you train: "
         "llasm-jax data encode --ckpt MODEL --data RAW_DATASET --out DIR")
  if marker.get("format") != CACHE_FORMAT:
    raise UserError(f"{where}: cache format {marker.get('format')}, this llasm_jax reads format {CACHE_FORMAT}; {fix}")
  if marker["mode"] != cfg.mode:
    raise UserError(f"{where}: features cached in {marker['mode']!r} mode, but the model runs in {cfg.mode!r} "
                     f"mode; {fix}")
  facts = {"num_mel_bins": cfg.audio.num_mel_bins, "feature_dim": cfg.feature_dim, **_decoder_facts(cfg)}
  for key, want in facts.items():
    if marker.get(key) != want:
      raise UserError(f"{where}: features cached with {key}={marker.get(key)}, the model has {key}={want} "
                       f"(another Whisper); {fix}")
  if not cfg.padded_mel and marker["mel_frames"] != mel_frames:
    raise UserError(f"{where}: features cached in {marker['mel_frames']}-frame windows but config.data.mel_frames "
                     f"is {mel_frames}; set --config.data.mel_frames={marker['mel_frames']}, or encode again with "
                     f"--mel-frames {mel_frames}")
  if whisper_fingerprint is not None and marker["whisper"]["fingerprint"] != whisper_fingerprint:
    raise UserError(f"{where}: features cached by another Whisper (weights {marker['whisper']['fingerprint']}, "
                     f"the model's {whisper_fingerprint}); {fix}")


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


def check_batch(batch: dict[str, np.ndarray], cfg: LlasmConfig) -> None:
  """Raises if a host batch breaks the contract or its audio markers disagree with its slots."""
  b, t = batch["input_ids"].shape
  cached = "audio_features" in batch
  audio = ([("audio_features", (np.float32, ml_dtypes.bfloat16)), ("audio_feature_lengths", (np.int32,))] if cached
           else [("mel", (np.float32,)), ("mel_lengths", (np.int32,))])
  teacher = [(k, (np.int32,)) for k in TEACHER_KEYS] if "teacher_input_ids" in batch else []
  packed = [(k, (np.int32,)) for k in PACKED_KEYS] if "segment_ids" in batch else []
  for k, dtypes in [(k, (np.int32,)) for k in TEXT_KEYS] + audio + teacher + packed:
    if batch[k].dtype not in dtypes or batch[k].shape[0] != b:
      raise UserError(f"batch[{k!r}]: {batch[k].dtype}{list(batch[k].shape)}, expected "
                       f"{'|'.join(np.dtype(d).name for d in dtypes)}[{b}, ...]")
  if teacher:
    if batch["teacher_target_positions"].shape != batch["target_positions"].shape:
      raise UserError(f"batch['teacher_target_positions'] {list(batch['teacher_target_positions'].shape)}: "
                       f"expected the shape of target_positions {list(batch['target_positions'].shape)}")
    if np.isin(batch["teacher_input_ids"], [cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id]).any():
      raise UserError("batch['teacher_input_ids'] holds audio marker tokens; the teacher reads text only")
  if packed:
    check_segments(batch)
  if cached:
    # Encoder frames S come from 2S mel frames (encoder_frames(2S) = S), so the owner of the
    # token count, `audio_tokens`, is asked with a mel length that gives S.
    lengths = 2 * batch["audio_feature_lengths"]
  else:
    lengths = batch["mel_lengths"]
  tokens = np.where(lengths > 0, np.vectorize(cfg.audio_tokens)(np.maximum(lengths, 1)), 0)
  check_audio_markers(cfg, batch["input_ids"], tokens)


def check_segments(batch: dict[str, np.ndarray]) -> None:
  """Raises unless packed rows number their samples 1, 2, ... left to right, 0 exactly on padding,
  and each sample's positions count up from the row's first (0, or P after a shared prefix)."""
  seg, pos, mask = batch["segment_ids"], batch["positions"], batch["attention_mask"]
  for b in range(seg.shape[0]):
    n = int(mask[b].sum())
    s, p = seg[b, :n], pos[b, :n]
    steps = np.diff(s)
    if np.any(seg[b, n:] != 0) or (n and s[0] != 1) or np.any((steps != 0) & (steps != 1)):
      raise UserError(f"row {b}: segment_ids {s[:16].tolist()}...: expected 1, 2, ... on its {n} real tokens "
                       "(consecutive, left to right) and 0 on padding")
    starts = np.maximum.accumulate(np.where(np.concatenate([[True], steps != 0]), np.arange(n), 0))
    if n and not np.array_equal(p, pos[b, 0] + np.arange(n) - starts):
      raise UserError(f"row {b}: positions do not restart at {int(pos[b, 0])} with each sample (segment_ids)")


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
