"""Tiny converted checkpoints with a real (offline-trained) tokenizer, shared by the Generator and CLI tests."""

import pytest
import soundfile as sf
import tokenizers
import torch
import transformers as tf
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llasm_jax.data.audio import synth_speech
from llasm_jax.convert.convert import convert
from tests.models.test_whisper import randomize_biases, tiny_whisper_config

CORPUS = ["the quick brown fox jumps over the lazy dog", "what is said in this audio?", "hello world",
          "please transcribe the speech", "you are a helpful language and speech assistant"]


def tiny_tokenizer(vocab_size=300) -> tf.PreTrainedTokenizerFast:
  """A byte-level BPE trained offline on a few sentences; BOS in front, as LLaMA tokenizers add it."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_hf_pair(root, seed=0) -> None:
  """A tiny random HF LLaMA (with the tokenizer) in root/hf_llm and Whisper in root/hf_whisper."""
  tok = tiny_tokenizer()
  torch.manual_seed(seed)
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(
      vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, initializer_range=0.1, bos_token_id=1, eos_token_id=2))
  llm.save_pretrained(root / "hf_llm")
  tok.save_pretrained(root / "hf_llm")
  whisper = tf.WhisperModel(tiny_whisper_config())
  randomize_biases(whisper)
  whisper.save_pretrained(root / "hf_whisper")


def make_checkpoints(root, mode="encoder") -> dict[str, str]:
  """Converted folders: "llasm" (LLM + Whisper, tokenizer with audio markers), "llama" (text
  only), "whisper" (Whisper alone)."""
  save_hf_pair(root)
  out = {k: str(root / k) for k in ("llasm", "llama", "whisper")}
  convert(str(root / "hf_llm"), str(root / "hf_whisper"), out=out["llasm"], mode=mode, progress=False)
  convert(str(root / "hf_llm"), out=out["llama"], progress=False)
  convert(whisper_dir=str(root / "hf_whisper"), out=out["whisper"], progress=False)
  return out


def write_wav(path, seconds, seed=0):
  sf.write(path, synth_speech(seconds, seed), 16000)
  return str(path)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  out = make_checkpoints(root)
  out["wav"] = write_wav(root / "speech.wav", 1.5)
  out["wav2"] = write_wav(root / "speech2.wav", 2.5, seed=1)
  return out


@pytest.fixture(scope="session")
def whisper(tmp_path_factory):
  """The multilingual tiny random Whisper of test_transcribe.py: transformers' model, our
  `Transcriber` of the folder converted from it (its executables shared by the tests), the root."""
  from tests.infer.test_transcribe import whisper_folder

  root = tmp_path_factory.mktemp("whisper")
  return (*whisper_folder(root, True), root)


@pytest.fixture(scope="session")
def gen(ckpts):
  """The LLaSM checkpoint loaded once (its compiled buckets serve every test that uses it)."""
  from llasm_jax.infer.generator import Generator

  return Generator.load(ckpts["llasm"])
