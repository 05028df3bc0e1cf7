"""The batch contract: what a host batch holds (`batch_spec`, its one spec), the config that shapes it, and its checks.

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
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from llasm_jax.data import features, templates
from llasm_jax.errors import UserError
from llasm_jax.models.geometry import AudioGeometry
from llasm_jax.models.llasm import LlasmConfig, check_audio_markers
from llasm_jax.tokens import IGNORE

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
FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))  # what a cache may store


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


def teacher_target_positions(teacher_labels: np.ndarray, student_slots: np.ndarray) -> np.ndarray:
  """teacher_labels int[B, Tt], the student's target_positions int32[B, K] -> int32[B, K]: the
  teacher's target positions, slot i of a row kept only where the student's slot i exists too
  (the two sequences may lose answer tokens to different cuts)."""
  b, k = student_slots.shape
  every = target_positions(teacher_labels, teacher_labels.shape[1])
  slots = np.full((b, k), -1, np.int32)
  for i in range(b):
    n = min(int(np.sum(every[i] >= 0)), int(np.sum(student_slots[i] >= 0)))
    slots[i, :n] = every[i, :n]
  return slots


def batch_keys(features: str = "mel", teacher: bool = False, prefix: bool = False,
               packed: bool = False, ctc: bool = False) -> tuple[str, ...]:
  """The keys of a batch whose audio comes as `features` ("mel" or "cached"), with the
  distillation teacher's text sequences or not, with a shared prefix (prefix_ids) or not, of
  packed rows (segment_ids) or not, with CTC targets or not."""
  if features not in FEATURES:
    raise UserError(f"features {features!r}: expected one of {FEATURES}")
  return (TEXT_KEYS + AUDIO_KEYS[features] + (TEACHER_KEYS if teacher else ()) + (("prefix_ids",) if prefix else ())
          + (PACKED_KEYS if packed else ()) + (CTC_KEYS if ctc else ()))


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
  def geometry(self) -> AudioGeometry:
    """The model's audio geometry with this config's window: every frame and token count below asks it."""
    return AudioGeometry(self.mode, self.audio_token_len, self.stack_factor, self.mel_frames)

  @property
  def frames(self) -> int:
    """F of the batch."""
    return self.geometry.frames

  @property
  def feature_frames(self) -> int:
    """The largest S of a cached batch: the decoder queries or transcript tokens, or the encoder
    frames of one window."""
    return self.geometry.window_features

  def feature_bucket(self, frames: int) -> int:
    """S of a cached batch whose longest slot has `frames` feature frames."""
    if self.mode != "encoder":  # one length: the decoder queries or the transcript tokens
      return self.feature_frames
    for b in self.feature_buckets or default_feature_buckets(self.feature_frames):
      if frames <= b:
        return b
    raise UserError(f"a cached audio slot of {frames} feature frames is longer than one {self.mel_frames}-frame "
                     "window; the dataset was encoded with longer windows than config.data.mel_frames")

  @property
  def ctc_width(self) -> int:
    """U of fixed-shape CTC targets: the adaptor frames of a row's full slots; a longer
    transcript cannot align (CTC emits at most one token per frame)."""
    return self.max_audios * self.geometry.window_tokens

  @property
  def fixed_shapes(self) -> bool:
    """Whether every batch has the same shapes (else a step compiles once per bucket combination)."""
    return self.buckets is None and (self.features == "mel" or self.mode != "encoder")

  def audio_tokens(self, mel_frames: int) -> int:
    """P of one slot of `mel_frames` mel frames (`AudioGeometry.audio_tokens`)."""
    return self.geometry.audio_tokens(mel_frames)

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



def batch_spec(cfg: PipelineConfig, batch: int, *, feature_dim: int = 0, feature_dtype="float32",
               prefix_len: int = 0) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Every key of a host or global batch of `batch` rows shaped by `cfg` -> (shape, dtype) at the
  largest buckets (T = seq_len, K = T, Tt = T, S = the window's feature frames, U = ctc_width).

  feature_dim, feature_dtype: E and the dtype of cached features (`features="cached"`);
  prefix_len: P of prefix_ids (`shared_prefix`, the template's fixed opening)."""
  b, t, a, i32 = batch, cfg.seq_len, cfg.max_audios, np.dtype(np.int32)
  spec = {k: ((b, t), i32) for k in TEXT_KEYS}
  if cfg.features == "cached":
    spec["audio_features"] = ((b, a, cfg.feature_frames, feature_dim), np.dtype(feature_dtype))
    spec["audio_feature_lengths"] = ((b, a), i32)
  else:
    spec["mel"] = ((b, a, cfg.num_mel_bins, cfg.frames), np.dtype(np.float32))
    spec["mel_lengths"] = ((b, a), i32)
  if cfg.teacher:
    spec.update({k: ((b, t), i32) for k in TEACHER_KEYS})
  if cfg.shared_prefix:
    spec["prefix_ids"] = ((prefix_len,), i32)
  if cfg.packing:
    spec["segment_ids"] = ((b, t), i32)
  if cfg.ctc:
    spec["ctc_labels"] = ((b, cfg.ctc_width), i32)
    spec["ctc_label_lengths"] = ((b,), i32)
  assert tuple(spec) == batch_keys(cfg.features, cfg.teacher, cfg.shared_prefix, cfg.packing, cfg.ctc)
  return spec


def check_batch(batch: dict[str, np.ndarray], cfg: LlasmConfig) -> None:
  """Raises if a host batch breaks the contract (`batch_spec`: its keys' dtypes, ranks and rows)
  or its audio markers disagree with its slots."""
  b, t = batch["input_ids"].shape
  cached = "audio_features" in batch
  teacher, packed = "teacher_input_ids" in batch, "segment_ids" in batch
  pcfg = PipelineConfig.from_model(cfg, features="cached" if cached else "mel", teacher=teacher, packing=packed,
                                   shared_prefix="prefix_ids" in batch, ctc="ctc_labels" in batch)
  for k, (shape, dtype) in batch_spec(pcfg, b).items():
    dtypes = FEATURE_DTYPES if k == "audio_features" else (dtype,)
    rows = BATCH_AXES[k][0] == "batch"
    if batch[k].dtype not in dtypes or batch[k].ndim != len(shape) or (rows and batch[k].shape[0] != b):
      raise UserError(f"batch[{k!r}]: {batch[k].dtype}{list(batch[k].shape)}, expected "
                       f"{'|'.join(np.dtype(d).name for d in dtypes)}[{b if rows else 'P'}, ...]")
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
