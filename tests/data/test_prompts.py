"""`prompts`: audio -> 30 s windows -> audio tokens -> placeholders -> ids, against spans written here by hand."""

import numpy as np
import pytest

from llasm_jax.data import features, featurize, pipeline
from llasm_jax.data.audio import AudioError, synth_speech
from llasm_jax.data.prompts import AudioPrompts, conversation, expand_placeholders, user_content
from llasm_jax.data.templates import get_template
from llasm_jax.errors import UserError
from tests.data.conftest import tiny_model

SPAN = "<au_start>{}<au_end>"


def test_windows_per_mode():
  wave = synth_speech(31.0, 0)  # 30 s + 1 s
  enc = AudioPrompts.of(tiny_model("encoder"))
  windows = enc.windows(wave)
  assert [w.shape for w in windows] == [(80, 3000), (80, 100)]
  np.testing.assert_array_equal(windows[0], features.log_mel(wave[:480000], 80, "encoder"))
  np.testing.assert_array_equal(windows[1], features.log_mel(wave[480000:], 80, "encoder"))
  # Shorter windows (config.data.mel_frames), and the pipeline's slots are these windows.
  short = AudioPrompts.of(pipeline.PipelineConfig.from_model(tiny_model("encoder"), mel_frames=300))
  assert [w.shape[1] for w in short.windows(wave)] == [300] * 10 + [100]
  slots, mels = featurize.audio_slots([wave, wave[:16000]],
                                     pipeline.PipelineConfig.from_model(tiny_model("encoder"), mel_frames=300))
  assert slots == [11, 1]
  assert all(np.array_equal(a, b) for a, b in zip(mels, short.windows(wave) + short.windows(wave[:16000])))
  # "llasm" mode: the first 30 s, one 3000-frame window.
  [one] = AudioPrompts.of(tiny_model()).windows(wave)
  np.testing.assert_array_equal(one, features.log_mel(wave, 80, "llasm"))
  # Log-mels pass as they are: one window, or the windows of one audio.
  assert len(enc.windows(windows)) == 2 and enc.windows(windows[1])[0].shape == (80, 100)


def test_windows_errors():
  with pytest.raises(UserError, match="text-only"):
    AudioPrompts.of(None).windows(np.zeros(16000, np.float32))
  enc = AudioPrompts.of(tiny_model("encoder"))
  with pytest.raises(UserError, match="taken as log-mel features"):
    enc.windows(np.zeros((16000, 2), np.float32))
  with pytest.raises(AudioError, match="no samples"):
    enc.windows(np.zeros(0, np.float32))


def test_placeholders_and_conversation():
  msgs = [{"role": "user", "content": "<audio> then <audio>"}, {"role": "assistant", "content": "ok"},
          {"role": "user", "content": "and <audio>"}]
  out = expand_placeholders(msgs, [2, 1, 3])
  assert [m["content"] for m in out] == ["<audio><audio> then <audio>", "ok", "and <audio><audio><audio>"]
  assert msgs[0]["content"] == "<audio> then <audio>"  # not changed in place
  with pytest.raises(UserError, match="2 audios given but the messages hold 3"):
    expand_placeholders(msgs, [1, 1])
  assert user_content("what is it", 2) == "<audio><audio>\nwhat is it" and user_content("hi", 0) == "hi"
  assert user_content("", 1) == "<audio>"
  assert conversation("what is it", 1) == [{"role": "user", "content": "<audio>\nwhat is it"},
                                           {"role": "assistant", "content": ""}]
  assert conversation("<audio> is what?", 1)[0]["content"] == "<audio> is what?"
  assert conversation(msgs[:2]) == msgs[:2]  # ends with an assistant turn: no generation slot added


def test_encode_writes_one_span_per_window(tokenizer):
  """A 31 s audio in encoder mode is two spans, of the two windows' token counts."""
  cfg = tiny_model("encoder")
  owner = AudioPrompts.of(cfg)
  template = get_template("llasm-cllama2", tokenizer)
  wave = synth_speech(31.0, 1)
  msgs = [{"role": "user", "content": "<audio> hello"}, {"role": "assistant", "content": "one two"}]
  ids, labels, mels = owner.encode(template, msgs, [wave])
  p0, p1 = cfg.audio_tokens(3000), cfg.audio_tokens(100)
  written = [{"role": "user", "content": "<audio><audio> hello"}, msgs[1]]  # one placeholder per window
  want_ids, want_labels = get_template("llasm-cllama2", tokenizer).encode(written, [p0, p1])
  assert ids.tolist() == want_ids.tolist() and labels.tolist() == want_labels.tolist()
  text = tokenizer.decode(ids)
  assert SPAN.format("<au_patch>" * p0) + SPAN.format("<au_patch>" * p1) in text.replace(" ", "")
  assert [m.shape[1] for m in mels] == [3000, 100]
  # Known by their windows alone (cached features): the same ids.
  ids2, _ = owner.encode_windows(template, msgs, [2], [3000, 100])
  assert ids2.tolist() == ids.tolist()
