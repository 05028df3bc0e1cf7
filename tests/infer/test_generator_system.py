"""Generator(system=...): the system prompt of the template, a chat template's own, or the user's."""

import types

import pytest

from llasm_jax.data.templates import LLASM_SYSTEM
from llasm_jax.infer.generator import Generator
from tests.infer.conftest import tiny_tokenizer

OWN = "You are Tiny, a test assistant."
CHAT = ("{% if messages[0]['role'] != 'system' %}<|system|>" + OWN + "\n{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("template, system, expected", [
    ("chat-template", None, OWN), ("chat-template", "", OWN), ("chat-template", "Be brief.", "Be brief."),
    ("llasm-cllama2", None, LLASM_SYSTEM), ("llasm-cllama2", "Be brief.", "Be brief.")])
def test_system_prompt(template, system, expected):
  """LLaSM's system prompt belongs to the LLaSM templates; a chat template writes its own."""
  tok = tiny_tokenizer()
  tok.chat_template = CHAT
  gen = Generator(types.SimpleNamespace(audio_cfg=None), tok, template=template, system=system)
  text = tok.decode(gen.prepare("What is the weather?")[0])
  assert expected in text and "What is the weather?" in text
  for other in {LLASM_SYSTEM, OWN, "Be brief."} - {expected}:
    assert other not in text
