"""The prompt format a model uses by default: the user's > the folder's record > the tokenizer's chat
template (with its own system prompt) > llasm-cllama2 / none; `Generator.prepare`; the real SmolLM2."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
import transformers as tf

from llasm_jax import checkpoint, cli
from llasm_jax.convert import registry
from llasm_jax.convert.convert import convert
from llasm_jax.data.templates import LLASM_SYSTEM, default_template
from llasm_jax.errors import UserError
from llasm_jax.infer.generator import Generator
from tests.infer.conftest import tiny_tokenizer

OWN = "You are Tiny, a test assistant."
# A chat template that writes its own system prompt when the conversation has none (as SmolLM2's does).
CHAT = ("{% if messages[0]['role'] != 'system' %}<|system|>" + OWN + "\n{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QUESTION = "what is said in this audio?"


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
  """A tiny text-only LLM whose tokenizer has a chat template, converted; and its tokenizer."""
  root = tmp_path_factory.mktemp("chat_llm")
  tok = tiny_tokenizer()
  tok.chat_template = CHAT
  torch.manual_seed(0)
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=1, bos_token_id=1, eos_token_id=2))
  llm.save_pretrained(root / "hf")
  tok.save_pretrained(root / "hf")
  convert(str(root / "hf"), out=str(root / "ck"), progress=False)
  return str(root / "ck"), tok


def reference_ids(tok, messages):
  """The tokenizer's own rendering of the conversation with the generation prompt."""
  return list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def with_record(src: str, dst: str, record: dict | None) -> str:
  """A copy of the model folder `src` whose llasm_jax.json records `record` (None: none)."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, checkpoint.META_FILE)
  with open(path) as f:
    meta = json.load(f)
  meta.pop(checkpoint.PROMPT_KEY, None)
  if record is not None:
    meta[checkpoint.PROMPT_KEY] = record
  with open(path, "w") as f:
    json.dump(meta, f)
  return dst


def test_a_chat_tokenizer_uses_its_chat_template_and_own_system_prompt(chat_llm):
  folder, tok = chat_llm
  gen = Generator.load(folder)
  assert gen.template_name == "chat-template" and gen.system is None
  user = [{"role": "user", "content": QUESTION}]
  ids, mels = gen.prepare(QUESTION)
  assert ids == reference_ids(tok, user) and mels == []
  text = tok.decode(ids)
  assert OWN in text and LLASM_SYSTEM not in text
  # The user's system prompt: at load, or as the conversation's first (OpenAI-style) message.
  system = [{"role": "system", "content": "Be brief."}]
  assert Generator.load(folder, system="Be brief.").prepare(QUESTION)[0] == reference_ids(tok, system + user)
  assert gen.prepare(system + user)[0] == reference_ids(tok, system + user)
  assert OWN not in tok.decode(gen.prepare(system + user)[0])
  # A whole conversation, and a system message out of place.
  talk = user + [{"role": "assistant", "content": "hello world"}, {"role": "user", "content": "the quick brown fox"}]
  assert gen.prepare(talk)[0] == reference_ids(tok, talk)
  with pytest.raises(UserError, match="system message must come first"):
    gen.prepare(user + system)


def test_the_folder_record_and_its_precedence(chat_llm, tmp_path):
  folder, tok = chat_llm
  recorded = with_record(folder, str(tmp_path / "rec"), {"template": "llasm-cllama2", "system": "Recorded."})
  gen = Generator.load(recorded)
  assert (gen.template_name, gen.system) == ("llasm-cllama2", "Recorded.")
  text = tok.decode(gen.prepare(QUESTION)[0])
  assert text.count("Recorded.") == 2 and "[INST] " in text and OWN not in text  # cllama2 writes it twice
  # An explicit template beats the record (whose system prompt belonged to its own template).
  gen = Generator.load(recorded, template="chat-template")
  assert (gen.template_name, gen.system) == ("chat-template", None)
  assert gen.prepare(QUESTION)[0] == reference_ids(tok, [{"role": "user", "content": QUESTION}])
  # An explicit system prompt beats the record's; the record's template stays.
  gen = Generator.load(recorded, system="Mine.")
  assert (gen.template_name, gen.system) == ("llasm-cllama2", "Mine.")
  # A per-call template beats the load-time one; a record of the system prompt "" (none) is kept.
  assert Generator.load(recorded).prepare(QUESTION, template="none")[0] == tok.encode(QUESTION)
  empty = with_record(folder, str(tmp_path / "empty"), {"template": "llasm-cllama2", "system": ""})
  assert LLASM_SYSTEM not in tok.decode(Generator.load(empty).prepare(QUESTION)[0])
  # A folder without a record (written before it existed) loads with the defaults.
  old = with_record(folder, str(tmp_path / "old"), None)
  assert Generator.load(old).template_name == "chat-template"
  bad = with_record(folder, str(tmp_path / "bad"), {"template": "nope"})
  with pytest.raises(UserError, match="template 'nope' \\(recorded in the model folder"):
    Generator.load(bad)


def test_old_defaults_without_a_chat_template(ckpts, gen):
  """No chat template: llasm-cllama2 with LLaSM's system prompt for a LLaSM, none for a text-only LLM."""
  assert (gen.template_name, gen.system) == ("llasm-cllama2", None)
  assert LLASM_SYSTEM in gen.tokenizer.decode(gen.prepare(QUESTION, [ckpts["wav"]])[0])
  llm = Generator.load(ckpts["llama"])
  assert llm.template_name == "none" and llm.prepare("hello world")[0] == llm.tokenizer.encode("hello world")


def test_prepare_gives_the_engine_row(gen, ckpts, tmp_path):
  """prepare: one prompt and its audios -> (ids, per-window log-mels in order), as `generate` uses them."""
  from tests.infer.conftest import write_wav

  long = write_wav(tmp_path / "long.wav", 31.0)
  ids, mels = gen.prepare("<audio> then <audio>", [long, ckpts["wav"]])
  assert [m.shape[1] for m in mels] == [3000, 100, 150]  # 31 s: two windows; 1.5 s: one
  assert ids.count(gen.cfg.audio_start_id) == 3
  assert ids.count(gen.cfg.audio_patch_id) == sum(gen.cfg.audio_tokens(m.shape[1]) for m in mels)
  # The same from messages, from log-mels (the windows of each audio), and from the ids themselves.
  messages = [{"role": "user", "content": "<audio> then <audio>"}]
  assert gen.prepare(messages, [long, ckpts["wav"]])[0] == ids
  windows = [gen.features(long), gen.features(ckpts["wav"])]
  assert gen.prepare("<audio> then <audio>", windows)[0] == ids
  same_ids, same_mels = gen.prepare(ids, [long, ckpts["wav"]])
  assert same_ids == ids and all(np.array_equal(a, b) for a, b in zip(same_mels, mels))
  with pytest.raises(UserError, match="2 audios given but the messages hold 1"):
    gen.prepare("<audio> alone", [long, ckpts["wav"]])
  [res] = gen.generate(["<audio> then <audio>"], [[long, ckpts["wav"]]], max_new_tokens=1)
  assert res.prompt_token_ids == ids


SMOLLM2 = registry.smollm2_gguf()


@pytest.mark.skipif(SMOLLM2 is None, reason=f"the registry's SmolLM2-135M-Instruct absent: {registry.INSTALL_HINT}")
def test_smollm2_answers_with_its_own_chat_template(tmp_path, capsys):
  """The new user's case: a converted chat model answers `generate --prompt` out of the box."""
  t0 = time.perf_counter()
  folder = str(tmp_path / "smol")
  convert(SMOLLM2, out=folder, progress=False)
  assert default_template(tf.AutoTokenizer.from_pretrained(folder), False)[0] == "chat-template"
  code = cli.main(["generate", "--ckpt", folder, "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "16"])
  out = capsys.readouterr()
  assert code == 0, out.err
  assert "Paris" in out.out, out.out
  print(f"SmolLM2 convert + generate: {time.perf_counter() - t0:.1f} s")


@pytest.mark.parametrize("source", ["tfds", "synthetic"])
def test_training_records_its_prompt_format(ckpts, tmp_path, source):
  """`train` writes the template and system prompt of its batches into model/; generate defaults to them."""
  import types

  import ml_collections
  from flax import nnx

  from llasm_jax.train.checkpoints import save_model
  from llasm_jax.train.sections import training_sections

  model, _ = checkpoint.load_model(ckpts["llasm"])
  _, params, rest = nnx.split(model, nnx.Param, ...)
  config = ml_collections.ConfigDict(training_sections(1))
  config.data.update(dict(source=source, template="llasm-baichuan", system="Recorded."))
  config.train.init_from = ckpts["llasm"]
  folder = str(tmp_path / "model")
  save_model(folder, model.cfg, types.SimpleNamespace(params=params, rest=rest), config)
  record = checkpoint.prompt_record(checkpoint.read_meta(folder))
  gen = Generator.load(folder)
  if source == "synthetic":  # synthetic batches have no prompt format to record
    assert record is None and gen.template_name == "llasm-cllama2"
    return
  assert record == {"template": "llasm-baichuan", "system": "Recorded."}
  assert (gen.template_name, gen.system) == ("llasm-baichuan", "Recorded.")
  assert gen.tokenizer.decode(gen.prepare("hello world")[0]).count("Recorded.") == 1
