"""Conversation templates: llasm-cllama2 ids against a reference written here from LLASM.md, labels, and the others."""

import numpy as np
import pytest

from llasm_jax.data.templates import (IGNORE, TRANSCRIBE_EN, TRANSCRIBE_ZH, asr_messages, check_tokenizer_markers,
                                      get_template)
from llasm_jax.errors import UserError
from llasm_jax.models.llasm import check_audio_markers
from tests.data.conftest import SYSTEM, tiny_model

B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def audio_text(p):
  return "<au_start>" + "<au_patch>" * p + "<au_end>"


def reference_cllama2(tok, turns):
  """The released prompt, rule by rule from shared/design/LLASM.md. turns: (role, content) with the audio
  already written as marker text; returns ids and the mask of positions that carry loss."""
  ids = tok.encode(B_SYS + SYSTEM + E_SYS, add_special_tokens=False)
  target = [False] * len(ids)
  first = True
  for role, content in turns:
    if role == "human":
      if first:
        content = B_SYS + SYSTEM + E_SYS + content
        first = False
      piece = tok.encode(f"[INST] {content} [/INST] ")  # this tokenizer adds BOS, as LLaMA's does
      assert piece[0] == tok.bos_token_id
      ids += piece
      target += [False] * len(piece)
    elif content:
      piece = tok.encode(f"{content} ", add_special_tokens=False) + [tok.eos_token_id]
      ids += piece
      target += [True] * len(piece)
  return ids, np.array(target)


CASES = {
    "single_turn_audio_only": ([("user", "<audio>"), ("assistant", "hello world")], [64]),
    "single_turn_text_and_audio": ([("user", "please transcribe <audio>"), ("assistant", "one two three")], [64]),
    "multi_turn_several_audios": ([("user", "compare <audio> with <audio>"), ("assistant", "same"),
                                   ("user", "<audio>\nwhat is this"), ("assistant", "请介绍一下北京"),
                                   ("user", "tell me a story"), ("assistant", "the weather is sunny")], [5, 17, 64]),
    "generation_slot": ([("user", "<audio>"), ("assistant", "hello"), ("user", "and <audio>?"),
                         ("assistant", "")], [64, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llasm_cllama2_matches_reference(tokenizer, case):
  turns, tokens = CASES[case]
  got_ids, got_labels = get_template("llasm-cllama2", tokenizer).encode(
      [{"role": r, "content": c} for r, c in turns], tokens)
  # The reference writes the audio in itself, in order.
  k, ref_turns = 0, []
  for role, content in turns:
    while "<audio>" in content:
      content = content.replace("<audio>", audio_text(tokens[k]), 1)
      k += 1
    ref_turns.append(("human" if role == "user" else "gpt", content))
  ref_ids, target = reference_cllama2(tokenizer, ref_turns)
  assert got_ids.dtype == np.int32 and got_labels.dtype == np.int32
  assert got_ids.tolist() == ref_ids
  np.testing.assert_array_equal(got_labels, np.where(target, ref_ids, IGNORE))
  # Quirks: the system text twice, one BOS per user turn, EOS closing each reply.
  text = tokenizer.decode(got_ids)
  assert text.count("You are a helpful language and speech assistant") == 2
  assert int(np.sum(got_ids == tokenizer.bos_token_id)) == sum(r == "user" for r, _ in turns)
  assert int(np.sum(got_ids == tokenizer.eos_token_id)) == sum(r == "assistant" and bool(c) for r, c in turns)
  # The markers agree with the audio slots as the model checks them.
  check_audio_markers(tiny_model(), got_ids[None], np.array([tokens]))


def test_llasm_cllama2_loss_only_on_replies(tokenizer):
  ids, labels = get_template("llasm-cllama2", tokenizer).encode(
      [{"role": "human", "content": "<audio>"}, {"role": "gpt", "content": "hello world"}], [64])
  assert tokenizer.decode(ids[labels != IGNORE]) == "hello world </s>"
  assert np.all(labels[:-1][labels[:-1] != IGNORE] == ids[:-1][labels[:-1] != IGNORE])


def test_llasm_baichuan(tokenizer):
  turns = [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "hello"},
           {"role": "user", "content": "what is this"}, {"role": "assistant", "content": "a world"}]
  ids, labels = get_template("llasm-baichuan", tokenizer).encode(turns, [4])
  enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
  ref = [tokenizer.bos_token_id] + enc(SYSTEM)
  target = [False] * len(ref)
  for t, audio in zip(turns, [audio_text(4), None, None, None]):
    if t["role"] == "user":
      piece = enc("USER:") + enc(audio or t["content"])
      ref, target = ref + piece, target + [False] * len(piece)
    else:
      head, reply = enc("ASSISTANT:"), enc(t["content"] + "</s>")
      ref, target = ref + head + reply, target + [False] * len(head) + [True] * len(reply)
  assert ids.tolist() == ref
  np.testing.assert_array_equal(labels, np.where(target, ref, IGNORE))
  assert reply[-1] == tokenizer.eos_token_id


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_template(tokenizer_dir):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  tok.chat_template = CHATML
  msgs = [{"role": "user", "content": "<audio> what is this"}, {"role": "assistant", "content": "hello world"},
          {"role": "user", "content": "and <audio>"}, {"role": "assistant", "content": "请介绍"}]
  ids, labels = get_template("chat-template", tok, system="").encode(msgs, [3, 2])
  expanded = [dict(m, content=m["content"].replace("<audio>", audio_text(3), 1)) for m in msgs[:2]] + \
             [dict(m, content=m["content"].replace("<audio>", audio_text(2), 1)) for m in msgs[2:]]
  text = tok.apply_chat_template(expanded, tokenize=False)
  assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids[labels != IGNORE]) == "hello world<|im_end|>\n请介绍<|im_end|>\n"
  # The generation prompt of an open conversation.
  ids, labels = get_template("chat-template", tok, system="").encode(msgs[:3] + [{"role": "assistant", "content": ""}],
                                                                      [3, 2])
  assert tok.decode(ids).endswith("<|im_start|>assistant\n")
  assert tok.decode(ids[labels != IGNORE]) == "hello world<|im_end|>\n"


def test_chat_template_needs_one(tokenizer):
  with pytest.raises(UserError, match="no chat_template"):
    get_template("chat-template", tokenizer)


def test_asr_messages_language_and_placement():
  zh_before = zh_after = en = 0
  for seed in range(60):
    rng = np.random.default_rng(seed)
    (user, reply) = asr_messages("请介绍一下勾股定理", "zh", rng)
    instruction = user["content"].replace("<audio>", "").strip()
    assert instruction in TRANSCRIBE_ZH and reply == {"role": "assistant", "content": "请介绍一下勾股定理"}
    if user["content"].startswith("<audio>"):
      zh_after += 1
    else:
      zh_before += 1
    en += asr_messages("hi", "en", np.random.default_rng(seed))[0]["content"].replace("<audio>", "").strip() \
        in TRANSCRIBE_EN
  assert zh_before > 10 and zh_after > 10 and en == 60
  a = asr_messages("x", "en", np.random.default_rng(7))
  assert a == asr_messages("x", "en", np.random.default_rng(7))  # seeded


def test_errors(tokenizer):
  tpl = get_template("llasm-cllama2", tokenizer)
  with pytest.raises(UserError, match="placeholders"):
    tpl.encode([{"role": "user", "content": "<audio> <audio>"}, {"role": "assistant", "content": "x"}], [64])
  with pytest.raises(UserError, match="audios given"):
    tpl.encode([{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "x"}], [64, 64])
  with pytest.raises(UserError, match="audio marker"):
    tpl.encode([{"role": "user", "content": "<au_patch>"}, {"role": "assistant", "content": "x"}], [])
  with pytest.raises(UserError, match="role"):
    tpl.encode([{"role": "robot", "content": "x"}], [])
  with pytest.raises(UserError, match="model config expects"):
    check_tokenizer_markers(tokenizer, {"<au_patch>": 32000})
  with pytest.raises(UserError, match="template 'nope'"):
    get_template("nope", tokenizer)


def chatml_tokenizer(tokenizer_dir, chat_template=CHATML):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  tok.chat_template = chat_template
  return tok


@pytest.mark.parametrize("name", ["llasm-cllama2", "llasm-baichuan", "chat-template", "none"])
def test_a_system_message_sets_the_system_prompt(tokenizer_dir, name):
  """OpenAI-style {"role": "system"} first: the conversation's system prompt, as `system=` would set it."""
  tok = chatml_tokenizer(tokenizer_dir)
  talk = [{"role": "user", "content": "<audio> hello world"}, {"role": "assistant", "content": "one two"},
          {"role": "user", "content": "and this"}, {"role": "assistant", "content": ""}]
  system = {"role": "system", "content": "be brief"}
  ids, labels = get_template(name, tok).encode([system] + talk, [3])
  want_ids, want_labels = get_template(name, tok, system="be brief").encode(talk, [3])
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(labels, want_labels)
  assert "be brief" in tok.decode(ids) and SYSTEM not in tok.decode(ids)
  # It beats the template's system prompt too, and must come first.
  np.testing.assert_array_equal(get_template(name, tok, system="other").encode([system] + talk, [3])[0], ids)
  with pytest.raises(UserError, match="system message must come first"):
    get_template(name, tok).encode(talk[:1] + [system] + talk[1:], [3])
  with pytest.raises(UserError, match="audio belongs to user turns"):
    get_template(name, tok).encode([{"role": "system", "content": "<audio>"}] + talk, [3, 3])


def test_default_system_prompts(tokenizer_dir):
  """LLaSM's system prompt belongs to the LLaSM templates; a chat template writes its own (none here)."""
  tok = chatml_tokenizer(tokenizer_dir)
  assert get_template("llasm-cllama2", tok).system == get_template("llasm-baichuan", tok).system == SYSTEM
  assert get_template("chat-template", tok).system is None and get_template("none", tok).system is None
  ids, _ = get_template("chat-template", tok).encode([{"role": "user", "content": "hello"},
                                                      {"role": "assistant", "content": ""}])
  assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
  ids, labels = get_template("none", tok).encode([{"role": "user", "content": "hello"},
                                                  {"role": "assistant", "content": ""}])
  assert ids.tolist() == tok.encode("hello") and np.all(labels == IGNORE)


def test_default_template_precedence():
  import types

  from llasm_jax.data.templates import default_template

  plain, chat = types.SimpleNamespace(chat_template=None), types.SimpleNamespace(chat_template="{{ x }}")
  assert default_template(plain, True) == ("llasm-cllama2", None)
  assert default_template(plain, False) == default_template(None, False) == ("none", None)
  assert default_template(chat, True) == default_template(chat, False) == ("chat-template", None)
  rec = {"template": "llasm-baichuan", "system": "R"}
  assert default_template(chat, True, rec) == ("llasm-baichuan", "R")
  assert default_template(chat, True, rec, template="llasm-baichuan") == ("llasm-baichuan", "R")
  assert default_template(chat, True, rec, template="chat-template") == ("chat-template", None)
  assert default_template(chat, True, rec, system="S") == ("llasm-baichuan", "S")
  assert default_template(chat, True, {"template": "llasm-baichuan", "system": None}) == ("llasm-baichuan", None)
  with pytest.raises(UserError, match="template 'nope'"):
    default_template(chat, True, template="nope")
