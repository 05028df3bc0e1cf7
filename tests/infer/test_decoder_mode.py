"""LLaSM "decoder" mode: Whisper's greedy transcript (its states, the token bridge) into the adaptor."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

from llasm_jax import checkpoint
from llasm_jax.convert.convert import convert
from llasm_jax.convert.export import export
from llasm_jax.data import features
from llasm_jax.errors import UserError
from tests.infer.conftest import tiny_tokenizer as llm_tokenizer
from tests.infer.test_transcribe import BEGIN_SUPPRESS, EOT, NO_TS, SOT, SUPPRESS, clips, tiny_tokenizer, tiny_whisper

S = 16  # transcript tokens per audio (the tiny Whisper reads 64 positions)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("decoder_mode")
  tiny_whisper(False).save_pretrained(root / "whisper")
  tiny_tokenizer().save_pretrained(root / "whisper")
  tok = llm_tokenizer()
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2))
  llm.save_pretrained(root / "llm")
  tok.save_pretrained(root / "llm")
  convert(str(root / "llm"), str(root / "whisper"), out=str(root / "ck"), mode="decoder", progress=False)
  return root


def load(folder, eot_scale: float = 1.0):
  """The converted model with S transcript tokens; `eot_scale` scales Whisper's <|endoftext|> row
  (its logit), so that some transcripts end within S tokens."""
  meta = checkpoint.read_meta(str(folder / "ck"))
  cfg = checkpoint.config_from_dict("llasm", meta["config"]).replace(audio_token_len=S)
  model = checkpoint.load_model(str(folder / "ck"), cfg=cfg)[0]
  table = model.audio.decoder.embed_tokens.embedding
  table[...] = table[...].at[EOT].multiply(eot_scale)
  return model


@pytest.fixture(scope="module")
def model(folder):
  return load(folder)


def test_convert_records_whisper_decoding_and_bridges_its_vocab(folder, model):
  cfg = model.cfg
  assert cfg.mode == "decoder" and cfg.with_decoder and not cfg.padded_mel
  assert cfg.decoder_prompt == (SOT, NO_TS) and cfg.decoder_eos == EOT
  assert cfg.decoder_suppress == tuple(SUPPRESS) and cfg.decoder_begin_suppress == tuple(BEGIN_SUPPRESS)
  assert cfg.feature_dim == cfg.audio.d_model + cfg.llm.hidden_size
  tok = tf.AutoTokenizer.from_pretrained(str(folder / "ck"))
  table = np.asarray(model.llm.model.embed_tokens.embedding[...])
  bridge = np.asarray(model.bridge[...])
  for i in (0, 7, 42, 98):  # Whisper's "w42" -> the first LLM token that spells it
    np.testing.assert_array_equal(bridge[i], table[tok.encode(f"w{i}", add_special_tokens=False)[0]])
  assert not bridge[EOT:].any()  # <|endoftext|> and the other specials spell nothing
  np.testing.assert_array_equal(np.asarray(model.adaptor.filler[...]),
                                table[tok.encode(" ", add_special_tokens=False)[0]])
  with pytest.raises(UserError, match="no Hugging Face layout"):
    export(str(folder / "ck"), str(folder / "hf"), progress=False)


def test_convert_takes_the_transcript_length(folder):
  from llasm_jax.convert.convert import plan

  llm, whisper = str(folder / "llm"), str(folder / "whisper")
  assert plan(llm, whisper, "decoder", audio_tokens=S).cfg.audio_token_len == S
  assert plan(llm, whisper, "decoder").cfg.audio_token_len == 64 - 2  # the tiny Whisper's positions less its prompt
  with pytest.raises(UserError, match="only 'decoder' mode"):
    plan(llm, whisper, "encoder", audio_tokens=S)
  for bad in (1, 63):
    with pytest.raises(UserError, match="expected 2"):
      plan(llm, whisper, "decoder", audio_tokens=bad)


def greedy_reference(model, mel, frames):
  """Whisper's greedy tokens and the decoder state that chose each, by hand: no cache, the whole
  prefix again at every step."""
  cfg = model.cfg
  states, n = model.audio.encoder(mel, frames)
  ids, out = list(cfg.decoder_prompt), []
  for step in range(cfg.audio_token_len):
    hidden, _ = model.audio.decoder(jnp.asarray([ids], jnp.int32), states, n)
    logits = np.array(model.audio.logits(hidden[:, -1:]))[0, 0]
    logits[list(cfg.decoder_suppress + (cfg.decoder_begin_suppress if step == 0 else ()))] = -np.inf
    token = int(np.argmax(logits))
    out.append((token, np.asarray(hidden[0, -1])))
    if token == cfg.decoder_eos:
      break
    ids.append(token)
  return out


def test_transcript_features_follow_whisper_greedy_decoding(folder):
  """A batch of clips of different lengths (and an empty slot) gives, per clip, the reference's
  tokens up to and with <|endoftext|>: each state beside the bridge row of the token it chose."""
  model = load(folder, eot_scale=1.2)  # one of the three ends after 9 tokens, the others run to S
  cfg = model.cfg
  mels = [features.log_mel(a, cfg.audio.num_mel_bins, "decoder") for a in clips((1.0, 2.5, 3.2))]
  f = max(m.shape[1] for m in mels)
  batch = np.zeros((4, 1, cfg.audio.num_mel_bins, f), np.float32)
  lengths = np.zeros((4, 1), np.int32)
  for i, m in enumerate(mels):
    batch[i, 0, :, :m.shape[1]] = m
    lengths[i, 0] = m.shape[1]
  feats, n = model.encode_audio(jnp.asarray(batch), jnp.asarray(lengths))
  feats, n = np.asarray(feats)[:, 0], np.asarray(n)[:, 0]
  assert feats.shape == (4, S, cfg.feature_dim) and n[3] == 0 and not feats[3].any()
  e, bridge = cfg.audio.d_model, np.asarray(model.bridge[...])
  ended = 0
  for i, m in enumerate(mels):
    want = greedy_reference(model, jnp.asarray(m[None]), jnp.asarray([m.shape[1]], jnp.int32))
    ended += want[-1][0] == EOT
    assert n[i] == len(want), i
    np.testing.assert_allclose(feats[i, :n[i], :e], np.stack([h for _, h in want]), atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(feats[i, :n[i], e:], bridge[[t for t, _ in want]])
    assert not feats[i, n[i]:].any()
  assert ended == 1  # a row that ends while the others go on, and rows cut at S: both paths covered


def test_untrained_adaptor_hands_the_llm_the_transcript(model):
  """The MLP starts at zero: the P outputs are the filler, then the transcript's bridge rows."""
  cfg = model.cfg
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 1, S, cfg.feature_dim)).astype(np.float32)
  embeds, valid = model.adapt(jnp.asarray(feats), jnp.asarray([[5], [0]], jnp.int32))
  embeds, valid = np.asarray(embeds), np.asarray(valid)
  assert valid[0, 0].all() and not valid[1, 0].any()  # an empty slot gives nothing
  np.testing.assert_allclose(embeds[0, 0, S - 5:], feats[0, 0, :5, cfg.audio.d_model:], atol=1e-6)
  np.testing.assert_allclose(embeds[0, 0, :S - 5], np.broadcast_to(np.asarray(model.adaptor.filler[...]), (S - 5, cfg.llm.hidden_size)))


def test_decoder_mode_mel_has_a_silent_tail():
  audio = clips((1.0,))[0]
  mel = features.log_mel(audio, 80, "decoder")
  tail = (features.DECODER_MIN_SAMPLES - len(audio)) // features.HOP
  assert mel.shape == (80, features.DECODER_MIN_SAMPLES // features.HOP)  # a short clip: half a window
  long = np.tile(audio, 14)  # 14 s: its own length and the tail
  assert features.num_frames(len(long), "decoder") == (len(long) + features.DECODER_TAIL_SAMPLES) // features.HOP
  assert np.allclose(mel[:, -tail + 2:], mel.min())  # past the speech: the floor, as Whisper pads
  padded = np.pad(audio, (0, features.DECODER_MIN_SAMPLES - len(audio)))
  np.testing.assert_allclose(mel[:, :len(audio) // features.HOP - 2],
                             features.log_mel(padded, 80, "encoder")[:, :len(audio) // features.HOP - 2])
  # A window keeps room for the tail: window and tail fill the frames of config.data.mel_frames.
  assert features.window_samples("decoder", 3000) + features.DECODER_TAIL_SAMPLES == 3000 * features.HOP
  assert features.num_frames(features.window_samples("decoder", 2000), "decoder") == 2000
  from llasm_jax.data import pipeline

  with pytest.raises(UserError, match="pads every audio to 1500 frames"):
    pipeline.PipelineConfig(mode="decoder", mel_frames=1000)


def test_config_errors_name_the_fix():
  from llasm_jax.models.llasm import LLASM_PRESETS

  tiny = LLASM_PRESETS["tiny"]
  with pytest.raises(UserError, match="convert --mode decoder"):
    tiny.replace(mode="decoder")
  with pytest.raises(UserError, match="no CTC head"):
    tiny.replace(mode="decoder", decoder_prompt=(1, 2), ctc=True)
  with pytest.raises(UserError, match="lower it"):
    tiny.replace(mode="decoder", decoder_prompt=(1, 2), audio_token_len=tiny.audio.max_target_positions)
