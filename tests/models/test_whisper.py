"""Whisper port against `transformers` PyTorch (float32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from llasm_jax.convert.configs import whisper_config_from_hf
from llasm_jax.convert.hf import keymaps, load_tensors, whisper_name
from llasm_jax.errors import UserError
from llasm_jax.models.whisper import WhisperModel, encoder_frames
from tests.conftest import assert_close, hf_tensors

TOL = 1e-4


def tiny_whisper_config(num_mel_bins=80, max_source_positions=1500):
  return tf.WhisperConfig(
      vocab_size=100, num_mel_bins=num_mel_bins, d_model=64, encoder_layers=2, encoder_attention_heads=4,
      encoder_ffn_dim=128, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
      max_source_positions=max_source_positions, max_target_positions=64, decoder_start_token_id=3,
      pad_token_id=0, bos_token_id=1, eos_token_id=2)


def randomize_biases(torch_model):
  with torch.no_grad():
    for n, p in torch_model.named_parameters():
      if n.endswith("bias") or "layer_norm.weight" in n:
        p.normal_(0, 0.1) if n.endswith("bias") else p.uniform_(0.5, 1.5)


def load_jax(torch_model, tmp_path, **run):
  tensors = hf_tensors(torch_model, tmp_path)
  model = WhisperModel(whisper_config_from_hf(torch_model.config.to_dict(), **run), rngs=nnx.Rngs(0))
  load_tensors(model, tensors.items(), keymaps("whisper"), rename=whisper_name)
  return model


@pytest.fixture(scope="module", params=[80, 128], ids=["80mel", "128mel"])
def pair(request, tmp_path_factory):
  torch.manual_seed(request.param)
  torch_model = tf.WhisperModel(tiny_whisper_config(request.param)).eval()
  randomize_biases(torch_model)
  return torch_model, load_jax(torch_model, tmp_path_factory.mktemp("whisper"))


def mel(batch, bins, frames, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (batch, bins, frames)).astype(np.float32)


def test_encoder_matches_transformers(pair):
  torch_model, model = pair
  x = mel(2, model.cfg.num_mel_bins, 3000)
  with torch.no_grad():
    ref = torch_model.encoder(torch.tensor(x)).last_hidden_state.numpy()
  out, frames = model.encoder(jnp.asarray(x))
  assert_close(np.asarray(out), ref, atol=TOL)
  assert np.asarray(frames).tolist() == [1500, 1500]


def test_decoder_matches_transformers_with_and_without_cache(pair):
  torch_model, model = pair
  x = mel(2, model.cfg.num_mel_bins, 3000, seed=1)
  ids = np.random.RandomState(2).randint(0, 100, (2, 10))
  with torch.no_grad():
    ref = torch_model(input_features=torch.tensor(x), decoder_input_ids=torch.tensor(ids)).last_hidden_state.numpy()
  states, frames = model.encoder(jnp.asarray(x))
  out, _ = model.decoder(jnp.asarray(ids), states, frames)
  assert_close(np.asarray(out), ref, atol=TOL)

  cache = model.decoder.init_cache(states, frames, max_len=16)
  step_out, cache = model.decoder(jnp.asarray(ids[:, :4]), cache=cache)
  steps = [np.asarray(step_out)]
  for t in range(4, 10):
    step_out, cache = model.decoder(jnp.asarray(ids[:, t:t + 1]), cache=cache)
    steps.append(np.asarray(step_out))
  assert_close(np.concatenate(steps, axis=1), ref, atol=TOL)


def test_cached_decoder_rows_at_their_own_lengths(pair):
  """Cache index int32[B] (each row at its own slot, as the LLM's `KVCache.per_row`): rows
  prefilled with 3 and 6 tokens (right-padded), then stepped, equal the HF decoder on each row."""
  torch_model, model = pair
  x = mel(2, model.cfg.num_mel_bins, 3000, seed=11)
  ids = np.random.RandomState(12).randint(0, 100, (2, 9))
  with torch.no_grad():
    ref = torch_model(input_features=torch.tensor(x), decoder_input_ids=torch.tensor(ids)).last_hidden_state.numpy()
  states, frames = model.encoder(jnp.asarray(x))
  cache = model.decoder.init_cache(states, frames, max_len=16)
  cache = cache.replace(self_kv=cache.self_kv.replace(index=jnp.zeros(2, jnp.int32)))
  lengths = np.array([3, 6])
  mask = np.arange(6)[None] < lengths[:, None]
  out, cache = model.decoder(jnp.asarray(np.where(mask, ids[:, :6], 0)), attention_mask=jnp.asarray(mask), cache=cache)
  for b, n in enumerate(lengths):
    assert_close(np.asarray(out[b, :n]), ref[b, :n], atol=TOL)
  cache = cache.replace(self_kv=cache.self_kv.replace(index=jnp.asarray(lengths, jnp.int32)))
  for k in range(3):
    out, cache = model.decoder(jnp.asarray(ids[np.arange(2), lengths + k])[:, None], cache=cache)
    for b, n in enumerate(lengths):
      assert_close(np.asarray(out[b, 0]), ref[b, n + k], atol=TOL)


def test_llasm_queries_match_transformers(pair):
  """LLaSM's audio feature: decoder over 64 start tokens = HF WhisperModel last_hidden_state."""
  torch_model, model = pair
  x = mel(1, model.cfg.num_mel_bins, 3000, seed=3)
  ids = np.full((1, 64), model.cfg.decoder_start_token_id)
  with torch.no_grad():
    ref = torch_model(input_features=torch.tensor(x), decoder_input_ids=torch.tensor(ids)).last_hidden_state.numpy()
  assert_close(np.asarray(model(jnp.asarray(x), jnp.asarray(ids))), ref, atol=TOL)


def test_short_audio_encoder_matches_transformers_on_shortened_input(tmp_path):
  """Fewer than 3000 frames: equal to the PyTorch encoder run on the shortened input.

  HF refuses non-3000 inputs, so the reference is the same weights in an HF Whisper whose
  max_source_positions is the shortened frame count (positions sliced, as ours are).
  """
  torch_model = tf.WhisperModel(tiny_whisper_config()).eval()
  randomize_biases(torch_model)
  model = load_jax(torch_model, tmp_path)
  mel_frames = 640
  frames = int(encoder_frames(mel_frames))
  short = tf.WhisperModel(tiny_whisper_config(max_source_positions=frames)).eval()
  state = dict(torch_model.state_dict())
  state["encoder.embed_positions.weight"] = state["encoder.embed_positions.weight"][:frames]
  short.load_state_dict(state)
  x = mel(1, 80, mel_frames, seed=4)
  with torch.no_grad():
    ref = short.encoder(torch.tensor(x)).last_hidden_state.numpy()

  out, got_frames = model.encoder(jnp.asarray(x))
  assert int(got_frames[0]) == frames
  assert_close(np.asarray(out), ref, atol=TOL)

  # In a batch padded to 3000 frames, the valid frames are unchanged by the padding.
  batch = np.concatenate([np.pad(x, ((0, 0), (0, 0), (0, 3000 - mel_frames)),
                                 constant_values=0.7), mel(1, 80, 3000, seed=5)])
  out_b, frames_b = model.encoder(jnp.asarray(batch), jnp.asarray([mel_frames, 3000]))
  assert np.asarray(frames_b).tolist() == [frames, 1500]
  assert_close(np.asarray(out_b)[0, :frames], ref[0], atol=TOL)


@pytest.mark.parametrize("mel_frames", [333, 1000])
def test_padding_in_a_batch_does_not_change_valid_frames(pair, mel_frames):
  """Odd and even lengths: a padded batch row equals the same audio run alone, unpadded."""
  _, model = pair
  x = mel(1, model.cfg.num_mel_bins, mel_frames, seed=7)
  alone, frames = model.encoder(jnp.asarray(x))
  batch = np.concatenate([np.pad(x, ((0, 0), (0, 0), (0, 1200 - mel_frames)), constant_values=-0.3),
                          mel(1, model.cfg.num_mel_bins, 1200, seed=8)])
  out, frames_b = model.encoder(jnp.asarray(batch), jnp.asarray([mel_frames, 1200]))
  assert int(frames_b[0]) == int(frames[0]) == alone.shape[1]
  assert_close(np.asarray(out)[0, :alone.shape[1]], np.asarray(alone)[0], atol=1e-5)


def test_scan_equals_unrolled(pair, tmp_path):
  torch_model, model = pair
  unrolled = load_jax(torch_model, tmp_path, scan_layers=False)
  x = jnp.asarray(mel(1, model.cfg.num_mel_bins, 3000, seed=6))
  ids = jnp.full((1, 8), 3)
  assert_close(np.asarray(model(x, ids)), np.asarray(unrolled(x, ids)), atol=1e-6)


def test_too_many_frames_is_a_clear_error(pair):
  _, model = pair
  with pytest.raises(UserError, match="split long audio"):
    model.encoder(jnp.zeros((1, model.cfg.num_mel_bins, 3002)))
