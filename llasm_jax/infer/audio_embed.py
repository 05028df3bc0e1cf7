"""Audio slots -> LLM embeddings for generation: Whisper + adaptor (or the adaptor alone on cached features), remembered per audio.

Legend: B prompts, N audios, A audio slots per prompt, P audio tokens per audio, M mel bins,
F mel frames, S cached feature frames, E feature width, D LLM width.

An audio slot is a log-mel float[M, F] or `AudioFeatures` (cached frozen-Whisper outputs).
Audios are packed into buckets (N rows, F frames rounded up), so each jitted function compiles
once per bucket; each distinct audio runs once and its embeddings are remembered (a chat sends
its earlier audios again every turn).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from llasm_jax.errors import UserError
from llasm_jax.infer.mesh import MeshFunctions, bucket
from llasm_jax.models.llasm import Llasm, check_audio_markers


@dataclasses.dataclass(frozen=True, eq=False)
class AudioFeatures:
  """One audio slot as cached frozen-Whisper outputs (`Llasm.encode_audio`, what `llasm-jax data
  encode` stores) instead of a log-mel: the engine runs only the adaptor on them.

  features:   float[S, E] the slot's valid feature frames (S = audio_token_len in "llasm" mode,
              ceil(F / 2) in "encoder" mode, 1..audio_token_len in "decoder" mode; E = LlasmConfig.feature_dim)
  mel_frames: F, the mel frames the slot had; its audio token count follows from them
  """

  features: np.ndarray
  mel_frames: int


def mel_frames(audio: "np.ndarray | AudioFeatures") -> int:
  """F of an audio slot given as log-mel float[M, F] or as `AudioFeatures`."""
  return audio.mel_frames if isinstance(audio, AudioFeatures) else audio.shape[1]


def host_slots(row: Sequence) -> list[np.ndarray | AudioFeatures]:
  """One prompt's audio slots as the embedder reads them: log-mels float32, `AudioFeatures` as they are."""
  return [x if isinstance(x, AudioFeatures) else np.asarray(x, np.float32) for x in row]


class AudioEmbedder:
  """The audio side of a `Llasm` for generation, jitted through `fns` (the engine's, so one
  `traces` counts every compilation). `memo_size` audios' embeddings are remembered."""

  def __init__(self, fns: MeshFunctions, model: Llasm, memo_size: int = 64):
    self.fns, self.cfg, self.memo_size = fns, model.cfg, memo_size
    self._memo: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
    self.update(model)

  def update(self, model: Llasm) -> None:
    """Takes `model`'s parameters (placed already); remembered embeddings are dropped."""
    self.graphdef, self.state = nnx.split(model)
    self._memo.clear()

  # ---- checks ----------------------------------------------------------------------------

  def check(self, prompts: list[list[int]], mels: list[list[np.ndarray | AudioFeatures]]) -> None:
    """Raises if a mel (or cached features) has the wrong shape or the markers of a prompt
    disagree with its audios (a prompt without audio may not hold markers either)."""
    cfg = self.cfg
    if len(mels) != len(prompts):
      raise UserError(f"{len(mels)} audio lists for {len(prompts)} prompts; pass one list (maybe empty) per prompt")
    m, f_max, e = cfg.audio.num_mel_bins, cfg.audio.max_mel_frames, cfg.feature_dim
    for b, (ids, row) in enumerate(zip(prompts, mels)):
      for j, mel in enumerate(row):
        f = mel_frames(mel)
        if isinstance(mel, AudioFeatures):
          s = cfg.feature_frames(f)
          if mel.features.ndim != 2 or mel.features.shape[1] != e or not cfg.feature_length_ok(len(mel.features), f):
            raise UserError(f"prompt {b} audio {j}: cached features of shape {mel.features.shape}, expected "
                             f"[{'1..' if cfg.mode == 'decoder' else ''}{s}, {e}] ({cfg.mode!r} mode, {f} mel frames, "
                             f"feature width {e}); were they encoded by this model's Whisper?")
        elif mel.ndim != 2 or mel.shape[0] != m:
          raise UserError(f"prompt {b} audio {j}: mel shape {mel.shape}, expected [{m}, frames] "
                           f"(this Whisper has num_mel_bins={m})")
        if f > f_max:
          raise UserError(f"prompt {b} audio {j}: {f} mel frames exceed 30 s ({f_max}); "
                           "split long audio into 30 s windows, one audio each")
        if cfg.padded_mel and f != f_max:
          raise UserError(f"prompt {b} audio {j}: {f} mel frames; 'llasm' mode reads features "
                           f"padded to 30 s ({f_max} frames), as Whisper's feature extractor makes them")
      counts = [cfg.audio_tokens(mel_frames(x)) for x in row]
      check_audio_markers(cfg, np.asarray([ids]), np.asarray([counts or [0]]))

  # ---- host side -------------------------------------------------------------------------

  def frames_bucket(self, mels: list[np.ndarray | AudioFeatures]) -> int:
    f_max = self.cfg.audio.max_mel_frames
    if self.cfg.padded_mel:
      return f_max
    return min(f_max, -(-max(mel_frames(x) for x in mels) // 256) * 256)

  def pack(self, mels: list[list[np.ndarray | AudioFeatures]], rows: int, timings) -> tuple:
    """Audio embeddings of every prompt (checked), packed: float[N, P, D], valid bool[N, P] and
    slots int32[B, A] (row b's a-th audio is number slots[b, a] of N; -1 = none; B = `rows`).
    `timings.audio_s` gets the seconds Whisper and the adaptor took."""
    flat = [x for row in mels for x in row]
    per_audio = self.embeddings(flat, timings)
    # P of the batch's frame bucket, so the prefill compiles once per bucket.
    p = self.cfg.audio_tokens(self.frames_bucket(flat))
    dtype = np.result_type(*[e.dtype for e in per_audio])
    embeds = np.zeros((self.fns.rows(len(flat)), p, per_audio[0].shape[-1]), dtype)
    valid = np.zeros(embeds.shape[:2], bool)
    for i, e in enumerate(per_audio):
      embeds[i, :len(e)] = e
      valid[i, :len(e)] = True
    slots = np.full((rows, bucket(max(len(r) for r in mels), minimum=1)), -1, np.int32)
    i = 0
    for b, row in enumerate(mels):
      slots[b, :len(row)] = np.arange(i, i + len(row))
      i += len(row)
    return embeds, valid, slots

  def embeddings(self, mels: list[np.ndarray | AudioFeatures], timings) -> list[np.ndarray]:
    """Each audio's embeddings float[P_i, D] (its valid tokens only). Whisper (or, for cached
    features, the adaptor) runs once per distinct audio."""
    def key(x):
      if isinstance(x, AudioFeatures):
        return b"cached" + hashlib.sha1(np.ascontiguousarray(x.features).tobytes()).digest() + str(
            (x.features.shape, str(x.features.dtype), x.mel_frames)).encode()
      return hashlib.sha1(x.tobytes()).digest() + str(x.shape).encode()

    keys = [key(x) for x in mels]
    todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
    if todo:
      t0 = time.perf_counter()
      new = {k: mels[keys.index(k)] for k in todo}
      for cached in (False, True):
        group = [k for k in todo if isinstance(new[k], AudioFeatures) == cached]
        if not group:
          continue
        embeds, valid = self._run([new[k] for k in group], cached)
        for i, k in enumerate(group):
          self._memo[k] = embeds[i, :int(valid[i].sum())]
      timings.audio_s = time.perf_counter() - t0
    out = []
    for k in keys:
      self._memo.move_to_end(k)
      out.append(self._memo[k])
    while len(self._memo) > self.memo_size:
      self._memo.popitem(last=False)
    return out

  def _run(self, new: list, cached: bool) -> tuple[np.ndarray, np.ndarray]:
    """Packed audios through Whisper + adaptor (log-mels) or the adaptor alone (cached features)."""
    rows = self.fns.rows(len(new))
    if cached:
      # S of the batch: the decoder queries or transcript tokens, or the encoder frames of the frame bucket.
      s = self.cfg.feature_frames(self.frames_bucket(new))
      feats = np.zeros((rows, s, new[0].features.shape[1]), new[0].features.dtype)
      lengths = np.zeros((rows,), np.int32)
      for i, x in enumerate(new):
        feats[i, :len(x.features)] = x.features
        lengths[i] = len(x.features)
      return tuple(self.fns.get(a) for a in self.adapt_features(feats, lengths))
    mel = np.zeros((rows, self.cfg.audio.num_mel_bins, self.frames_bucket(new)), np.float32)
    lengths = np.zeros((rows,), np.int32)
    for i, x in enumerate(new):
      mel[i, :, :x.shape[1]] = x
      lengths[i] = x.shape[1]
    return tuple(self.fns.get(a) for a in self.encode_audio(mel, lengths))

  # ---- jitted ----------------------------------------------------------------------------

  def encode_audio(self, mel: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Whisper + adaptor over packed audios: float32[N, M, F], int32[N] -> float[N, P, D], bool[N, P]."""
    return self._call("encode_audio", self._encode_audio_fn, mel, lengths)

  def adapt_features(self, features: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """The adaptor over packed cached Whisper outputs: float[N, S, E], int32[N] -> float[N, P, D], bool[N, P]."""
    return self._call("adapt", self._adapt_fn, features, lengths)

  def _call(self, name: str, fn, x: np.ndarray, lengths: np.ndarray):
    fns = self.fns
    in_sh = out_sh = (None, None, None)
    if fns.mesh is not None:
      in_sh = (fns.shardings_of(self.state), fns.logical(("batch", None, None)), fns.logical(("batch",)))
      out_sh = (fns.logical(("batch", None, "act_embed")), fns.logical(("batch", None)))
    fn = fns.jit(name, fn, in_sh, out_sh)
    with fns.tracing():
      return fn(self.state, fns.put(x, in_sh[1]), fns.put(lengths, in_sh[2]))

  def _encode_audio_fn(self, state, mel, mel_lengths):
    """mel float[N, M, F], mel_lengths int32[N] -> audio embeddings float[N, P, D], valid bool[N, P]."""
    self.fns.traces["encode_audio"] += 1
    model = nnx.merge(self.graphdef, state)
    embeds, valid = model.embed_audio(mel[:, None], mel_lengths[:, None])
    return embeds[:, 0], valid[:, 0]

  def _adapt_fn(self, state, features, lengths):
    """Cached Whisper outputs float[N, S, E], lengths int32[N] -> float[N, P, D], valid bool[N, P]."""
    self.fns.traces["adapt"] += 1
    model = nnx.merge(self.graphdef, state)
    embeds, valid = model.adapt(features[:, None], lengths[:, None])
    return embeds[:, 0], valid[:, 0]
