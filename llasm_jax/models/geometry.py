"""Audio geometry: how many mel frames, encoder frames, cached features and audio tokens an audio has.

Legend: F mel frames (100 per second, at most WINDOW_FRAMES = 30 s), S feature frames of one slot,
P audio tokens of one slot.
"""

from __future__ import annotations

import dataclasses

from llasm_jax.models.whisper import encoder_frames

# Mel frames of Whisper's 30 s window: the padded mel of "llasm" mode, and the longest window of the others.
WINDOW_FRAMES = 3000


@dataclasses.dataclass(frozen=True)
class AudioGeometry:
  """The one owner of audio geometry: mel frames F -> encoder frames -> audio tokens P, and the
  cached-feature length S. `LlasmConfig.geometry`, `PipelineConfig.geometry` and `AudioPrompts`
  give it; every count of frames or tokens asks it.

  mode: LlasmConfig.mode; audio_token_len, stack_factor: as LlasmConfig; mel_frames: the window
  (config.data.mel_frames) of the unpadded modes ("llasm" mode always reads WINDOW_FRAMES)."""

  mode: str = "llasm"
  audio_token_len: int = 64
  stack_factor: int = 8
  mel_frames: int = WINDOW_FRAMES

  @property
  def padded_mel(self) -> bool:
    """Whether Whisper reads every audio padded to 30 s ("llasm" mode) or unpadded (the others)."""
    return self.mode == "llasm"

  @property
  def frames(self) -> int:
    """F of a batch's mel: WINDOW_FRAMES when padded, else the window."""
    return WINDOW_FRAMES if self.padded_mel else self.mel_frames

  @property
  def window_features(self) -> int:
    """The largest S of one slot: the decoder queries or transcript tokens, or the encoder frames of a window."""
    return self.feature_frames(self.mel_frames)

  @property
  def window_tokens(self) -> int:
    """P of a full slot (the mel frames of a batch)."""
    return self.audio_tokens(self.frames)

  def feature_frames(self, mel_frames: int) -> int:
    """S of `encode_audio`'s features for an audio of `mel_frames` mel frames (at most, in "decoder" mode)."""
    return self.audio_token_len if self.mode != "encoder" else int(encoder_frames(mel_frames))

  def feature_length_ok(self, length: int, mel_frames: int) -> bool:
    """Whether `encode_audio` may give `length` feature frames for an audio of `mel_frames` mel
    frames: exactly `feature_frames`, or in "decoder" mode 1 to that (the transcript and its end)."""
    s = self.feature_frames(mel_frames)
    return 0 < length <= s if self.mode == "decoder" else length == s

  def audio_tokens(self, mel_frames):
    """Audio tokens P that an audio of `mel_frames` mel frames (an int or an int array) becomes."""
    if self.mode != "encoder":
      return self.audio_token_len
    return -(-encoder_frames(mel_frames) // self.stack_factor)
