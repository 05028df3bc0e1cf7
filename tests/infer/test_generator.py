"""`Generator` and `Chat` on tiny converted checkpoints with a real tokenizer: templates, audio files,
stop strings, streaming, and the errors users meet."""

import numpy as np
import pytest
import soundfile as sf

from llasm_jax.data import features, templates
from llasm_jax.data.audio import AudioError
from llasm_jax.errors import UserError
from llasm_jax.infer.generator import Chat, Generator
from tests.infer.conftest import tiny_tokenizer, write_wav

def test_prompt_follows_the_template_and_reply_decodes(gen, ckpts):
  [res] = gen.generate(["what is said in this audio?"], audios=[[ckpts["wav"]]], max_new_tokens=6)
  mel = features.log_mel(np.asarray(sf.read(ckpts["wav"], dtype="float32")[0]), 80, "encoder")
  tok = gen.tokenizer
  expected, _ = templates.get_template("llasm-cllama2", tok).encode(
      [{"role": "user", "content": "<audio>\nwhat is said in this audio?"}, {"role": "assistant", "content": ""}],
      [gen.cfg.audio_tokens(mel.shape[1])])
  assert res.prompt_token_ids == expected.tolist()
  assert len(res.token_ids) == 6 or res.finish_reason == "eos"
  assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)
  assert {"audio_s", "prefill_s", "decode_s", "decode_tokens_per_s", "features_s", "total_s"} <= set(res.timings)
  # The same ids and features through the engine directly give the same tokens.
  outs, _ = gen.engine.generate([res.prompt_token_ids], [[mel]], max_new_tokens=6)
  assert outs[0].token_ids == res.token_ids


def test_batch_with_different_audio_counts_equals_one_by_one(gen, ckpts):
  prompts = ["hello world", "what is said in this audio?", "<audio> then <audio>, compare them"]
  audios = [[], [ckpts["wav"]], [ckpts["wav2"], ckpts["wav"]]]
  batch = gen.generate(prompts, audios, max_new_tokens=5)
  for p, a, r in zip(prompts, audios, batch):
    [single] = gen.generate([p], [a], max_new_tokens=5)
    assert single.token_ids == r.token_ids and single.prompt_token_ids == r.prompt_token_ids
  assert r.prompt_token_ids.count(gen.cfg.audio_start_id) == 2


def test_stop_strings_and_streaming(gen, ckpts):
  kw = dict(audios=[[ckpts["wav"]]], max_new_tokens=24, temperature=1.0, seed=3)
  [full] = gen.generate(["please transcribe the speech"], **kw)
  assert len(full.text) > 8, full.text
  stop = full.text[5:8]
  pieces = []
  [res] = gen.generate(["please transcribe the speech"], stop=[stop], stream=lambda row, t: pieces.append(t), **kw)
  assert res.finish_reason == "stop"
  assert res.text == full.text[:full.text.index(stop)]
  assert "".join(pieces) == res.text
  assert res.token_ids == full.token_ids[:len(res.token_ids)]
  assert stop in gen.decode(res.token_ids) and stop not in gen.decode(res.token_ids[:-1])
  pieces = []
  [streamed] = gen.generate(["please transcribe the speech"], stream=lambda row, t: pieces.append(t), **kw)
  assert "".join(pieces) == streamed.text == full.text and len(pieces) > 1


def test_long_audio_is_split_into_30s_windows_in_encoder_mode(gen, tmp_path):
  wav = write_wav(tmp_path / "long.wav", 31.0)
  [res] = gen.generate(["what is said in this audio?"], [[wav]], max_new_tokens=2)
  spans = templates.audio_spans(np.asarray(res.prompt_token_ids), gen.cfg.audio_start_id, gen.cfg.audio_end_id)
  assert [e - s - 2 for s, e in spans] == [gen.cfg.audio_tokens(3000), gen.cfg.audio_tokens(100)]


def test_chat_keeps_the_conversation(gen, tmp_path):
  chat = Chat(gen)
  first = chat.send(audio=write_wav(tmp_path / "new.wav", 1.5, seed=5), max_new_tokens=4)
  second = chat.send("what is said in this audio?", max_new_tokens=4)
  assert first.timings["audio_s"] > 0 and second.timings["audio_s"] == 0  # Whisper once per audio
  assert second.prompt_token_ids[:len(first.prompt_token_ids)] == first.prompt_token_ids
  assert second.prompt_token_ids.count(gen.cfg.audio_patch_id) == first.prompt_token_ids.count(gen.cfg.audio_patch_id)
  assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
  with pytest.raises(AudioError, match="file not found"):
    chat.send(audio="/nonexistent.wav")
  assert len(chat.messages) == 4  # a failed turn changes nothing


def test_text_only_llm(ckpts):
  gen = Generator.load(ckpts["llama"])
  [res] = gen.generate(["hello world"], max_new_tokens=4)
  assert res.prompt_token_ids == gen.tokenizer.encode("hello world")
  assert res.prompt_token_ids[0] == gen.tokenizer.bos_token_id
  with pytest.raises(UserError, match="text-only"):
    gen.generate(["hello"], [[ckpts["wav"]]])
  chat = Chat(gen)  # no template: the turns' texts one after the other
  first = chat.send("hello world", max_new_tokens=3)
  second = chat.send("the quick brown fox", max_new_tokens=3)
  assert second.prompt_token_ids == gen.tokenizer.encode(
      "\n".join(t for t in ["hello world", first.text, "the quick brown fox"] if t))


def test_errors_name_the_input_and_the_fix(gen, ckpts, tmp_path):
  with pytest.raises(AudioError, match="file not found"):
    gen.generate(["hi"], [[str(tmp_path / "missing.wav")]])
  bad = tmp_path / "bad.mp3"
  bad.write_bytes(b"this is not audio" * 100)
  with pytest.raises(AudioError, match="cannot decode"):
    gen.generate(["hi"], [[str(bad)]])
  with pytest.raises(UserError, match="holds Whisper alone"):
    Generator.load(ckpts["whisper"])
  with pytest.raises(UserError, match="not a llasm_jax checkpoint"):
    Generator.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no such folder"):
    Generator.load(str(tmp_path / "nope"))
  with pytest.raises(UserError, match="taken as log-mel features"):
    gen.generate(["hi"], [[np.zeros((16000, 2), np.float32)]])
  with pytest.raises(UserError, match="template 'nope'"):
    gen.generate(["hi"], template="nope", max_new_tokens=1)
  # A tokenizer from another model: its audio markers disagree with the checkpoint.
  other = tiny_tokenizer()
  other.add_tokens(["<x>", *templates.MARKERS], special_tokens=True)
  with pytest.raises(UserError, match="model config expects"):
    Generator(gen.engine, other)
