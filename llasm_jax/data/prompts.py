"""The one owner of audio -> 30 s windows -> audio tokens -> `<audio>` placeholders -> prompt token ids.

Legend: N samples at 16 kHz, M mel bins, F mel frames of one window, P audio tokens of one window.

An audio (a path, a waveform float32[N], a log-mel float32[M, F], or a list of log-mels: an audio
already split into windows) becomes one log-mel per window: "llasm" mode reads the first 30 s
as one window (the released models' padded 30 s mel); "encoder" mode splits it into windows of
`mel_frames` frames (at most 30 s; `audio.split_windows`). Every window is an audio span of its
own in the text (`<au_start>` + P x `<au_patch>` + `<au_end>`, P = `audio_tokens(F)`), so the
conversation's `<audio>` placeholder of an audio (one per audio) is written once per window of
that audio, and the template (`templates.Template.encode`) writes the spans. Training
(`featurize.Featurize`, `data encode` through `featurize.audio_slots`), `eval` and inference
(`Generator.prepare`, `Chat`) all come through here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from llasm_jax.data import audio as audio_io
from llasm_jax.data import features
from llasm_jax.data.features import MAX_FRAMES
from llasm_jax.errors import UserError
from llasm_jax.models.geometry import AudioGeometry
from llasm_jax.tokens import AUDIO

_ASSISTANT = ("assistant", "gpt")


def user_content(text: str, audios: int) -> str:
  """A user turn of `audios` audios and `text`: the placeholders first, then the text on the
  next line (the order of the LLaSM demo)."""
  if not audios:
    return text
  return AUDIO * audios + ("\n" + text if text else "")


def conversation(prompt: str | Sequence[dict[str, Any]], audios: int = 0) -> list[dict[str, Any]]:
  """A prompt as messages that end in the generation slot (an empty assistant turn). prompt: a
  user's text (without `<audio>` placeholders, `audios` of them go in front of it) or messages."""
  if isinstance(prompt, str):
    messages = [{"role": "user", "content": prompt if AUDIO in prompt else user_content(prompt, audios)}]
  else:
    messages = [dict(m) for m in prompt]
  if not messages or str(messages[-1].get("role", messages[-1].get("from", ""))).lower() not in _ASSISTANT:
    messages.append({"role": "assistant", "content": ""})
  return messages


def expand_placeholders(messages: Sequence[dict[str, Any]], windows: Sequence[int]) -> list[dict[str, Any]]:
  """`messages` with the k-th `<audio>` of the conversation written windows[k] times, so that
  each window of audio k has its own marker span. Raises unless there is one placeholder per audio."""
  holders = sum(str(m.get("content", m.get("value", ""))).count(AUDIO) for m in messages)
  if holders != len(windows):
    raise UserError(f"{len(windows)} audios given but the messages hold {holders} {AUDIO!r} placeholders; "
                     f"write one {AUDIO!r} where each audio goes (in order), or pass one audio per placeholder")
  if all(n == 1 for n in windows):
    return [dict(m) for m in messages]
  out, k = [], 0
  for m in messages:
    m = dict(m)
    key = "content" if "content" in m else "value"
    parts = str(m.get(key, "")).split(AUDIO)
    text = parts[0]
    for part in parts[1:]:
      text += AUDIO * int(windows[k]) + part
      k += 1
    m[key] = text
    out.append(m)
  return out


@dataclasses.dataclass(frozen=True)
class AudioPrompts:
  """How audio enters a prompt: its windows, their log-mels and their audio tokens.

  geometry: the model's audio geometry with its window (mode, audio tokens per window), None for
  a text-only LLM (no audio); num_mel_bins: M."""

  geometry: AudioGeometry | None = None
  num_mel_bins: int = 80

  @classmethod
  def of(cls, cfg, mel_frames: int | None = None) -> "AudioPrompts":
    """Of a model (`LlasmConfig`; None: a text-only LLM) or a `contract.PipelineConfig` (whose
    `mel_frames` it takes unless `mel_frames` is given)."""
    if cfg is None:
      return cls()
    if hasattr(cfg, "audio"):  # a LlasmConfig: its geometry with windows of `mel_frames`
      return cls(cfg.geometry(int(mel_frames or MAX_FRAMES)), cfg.audio.num_mel_bins)
    geometry = dataclasses.replace(cfg.geometry, mel_frames=int(mel_frames)) if mel_frames else cfg.geometry
    return cls(geometry, cfg.num_mel_bins)

  @property
  def mode(self) -> str | None:
    """LlasmConfig.mode ("llasm", "encoder" or "decoder"); None for a text-only LLM."""
    return None if self.geometry is None else self.geometry.mode

  @property
  def mel_frames(self) -> int:
    """The unpadded modes' window in mel frames (at most 3000 = 30 s)."""
    return MAX_FRAMES if self.geometry is None else self.geometry.mel_frames

  def audio_tokens(self, mel_frames: int) -> int:
    """P of one window of `mel_frames` frames."""
    if self.geometry is None:
      raise UserError("this checkpoint is a text-only LLM; it cannot take audio")
    return self.geometry.audio_tokens(mel_frames)

  def windows(self, audio, name: str | None = None) -> list[np.ndarray]:
    """One audio -> the log-mel float32[M, F] of each of its windows, in order. audio: a path, a
    16 kHz waveform float32[N], a log-mel float32[M, F] (one window), or a list of log-mels
    (the windows of one audio, as this returned them)."""
    if self.mode is None:
      raise UserError("this checkpoint is a text-only LLM; it cannot take audio")
    if isinstance(audio, (list, tuple)) and audio and all(
        isinstance(a, np.ndarray) and a.ndim == 2 for a in audio):
      return [w for a in audio for w in self.windows(a)]
    if isinstance(audio, np.ndarray) and audio.ndim == 2:
      if audio.shape[0] != self.num_mel_bins:
        raise UserError(f"a 2-D audio array {audio.shape} is taken as log-mel features and needs "
                         f"{self.num_mel_bins} mel bins first; pass mono 16 kHz samples float32[N] instead")
      return [audio.astype(np.float32)]
    if isinstance(audio, (str, os.PathLike)):
      samples = audio_io.load_audio(audio)
      name = os.fspath(audio)
    else:
      samples, name = np.asarray(audio, np.float32).reshape(-1), name or "waveform"
    if samples.size == 0:
      raise audio_io.AudioError(name, "empty", "no samples (0 s of audio)")
    parts = ([samples] if self.mode == "llasm"
             else audio_io.split_windows(samples, features.window_samples(self.mode, self.mel_frames)))
    # A clip shorter than one FFT frame still gives Whisper at least one frame of input.
    parts = [np.pad(w, (0, max(0, features.N_FFT - len(w)))) for w in parts]
    return [features.log_mel(w, self.num_mel_bins, self.mode) for w in parts]

  def encode(self, template, messages: Sequence[dict[str, Any]], audios: Sequence[Any] = (),
             ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """messages (one `<audio>` per audio) and the audios (as `windows` takes them, in placeholder
    order) -> (input_ids int32[T], labels int32[T], the log-mel float32[M, F_j] of every window in order)."""
    per_audio = [self.windows(a) for a in audios]
    mels = [m for windows in per_audio for m in windows]
    ids, labels = self.encode_windows(template, messages, [len(w) for w in per_audio], [m.shape[-1] for m in mels])
    return ids, labels, mels

  def encode_windows(self, template, messages: Sequence[dict[str, Any]], windows: Sequence[int],
                     frames: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """`encode` of audios known by their windows alone (cached features): windows[k], the windows
    of audio k; frames, the mel frames of every window in order."""
    if sum(windows) != len(frames):
      raise UserError(f"{sum(windows)} windows over the audios but {len(frames)} window lengths")
    return template.encode(expand_placeholders(messages, windows), [self.audio_tokens(int(f)) for f in frames])
