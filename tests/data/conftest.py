"""Shared fixtures for the data tests: a tiny LLaMA sentencepiece tokenizer trained on the fly and matching tiny model configs."""

import random

import pytest

from llasm_jax.models.llasm import LLASM_PRESETS

SYSTEM = ("You are a helpful language and speech assistant. You are able to understand the speech content that "
          "the user provides, and assist the user with a variety of tasks using natural language.")
WORDS = ("the a speech audio model hello world weather paris transcribe please what is this one two three four five "
         "assistant user language helpful you are able to understand content provides tasks natural system sample "
         "compare with same sunny count story").split()
ZH = "请介绍一下勾股定理哪个国家人口最多北京天气今天怎么样转写语音文字这段说了什么"


def train_llama_tokenizer(folder):
  """A LLaMA-style sentencepiece BPE (byte fallback, identity normalisation, dummy prefix) trained on a few
  hundred synthetic lines, loaded as transformers' LlamaTokenizer with BOS added, plus the three audio tokens."""
  import sentencepiece as spm
  from transformers import LlamaTokenizer

  rng = random.Random(0)
  lines = []
  for _ in range(300):
    lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))))
    lines.append("".join(rng.choice(ZH) for _ in range(rng.randint(3, 12))))
  lines += [SYSTEM, "[INST] <<SYS>> <</SYS>> [/INST] USER: ASSISTANT:"] * 5
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=420, model_type="bpe",
      byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
  # transformers 5 converts tokenizer.model in from_pretrained (the bare constructor ignores vocab_file).
  tok = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
  tok.add_tokens(["<au_patch>", "<au_start>", "<au_end>"], special_tokens=True)
  return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama_tok")
  tok = train_llama_tokenizer(folder)
  out = folder / "hf"
  tok.save_pretrained(str(out))
  return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_model(mode="llasm", num_mel_bins=80):
  """The tiny LLaSM preset with the tokenizer's vocab (420 + <au_patch> 420, <au_start> 421, <au_end> 422)."""
  base = LLASM_PRESETS["tiny" if mode == "llasm" else "tiny_encoder"]
  return base.replace(llm=base.llm.replace(vocab_size=423), audio=base.audio.replace(num_mel_bins=num_mel_bins),
                      audio_patch_id=420, audio_start_id=421, audio_end_id=422)
