"""Conversation templates: messages with audio placeholders -> token ids and loss labels.

Legend: T tokens, P audio tokens of one audio (`LlasmConfig.audio_tokens(mel_frames)`).

Messages are `{"role": "user"|"assistant", "content": str}` ("human"/"gpt" also accepted), and
optionally a first `{"role": "system", "content": str}` (OpenAI's shape), which sets that
conversation's system prompt in place of the template's. A user content marks each audio
with the placeholder `<audio>`; the template writes it as `<au_start>` + P x `<au_patch>` +
`<au_end>` with the P of that audio (audios numbered in order over the whole conversation;
`prompts` writes one placeholder per 30 s window first). Labels follow the Hugging Face
convention: same length as input_ids, -100 where there is no loss (the training step shifts
them); only assistant replies (and the end-of-turn token after them) carry loss.

Templates (`get_template(name, tokenizer)`):
- "llasm-cllama2": the released LLaSM-Cllama2 prompt, quirks kept (shared/design/LLASM.md):
    encode(B_SYS + system + E_SYS)                                   no special tokens
    user:      [bos] + encode(f"[INST] {content} [/INST] ")          first user content prefixed by
                                                                     B_SYS + system + E_SYS again
    assistant: encode(f"{content} ") + [eos]                         no special tokens; loss here
  An empty assistant turn at the end is the generation slot (nothing is written for it).
- "llasm-baichuan": [bos] + encode(system), then per turn encode("USER:") + encode(content) or
  encode("ASSISTANT:") + encode(content + "</s>") (loss on the latter), as LLASM.md describes it;
  not checked against the released Baichuan code, which is not public.
- "chat-template": the tokenizer's own chat template (Llama 3, Qwen2, Mistral, ...); loss on
  the characters each assistant message adds to the rendered text (its end-of-turn included).
  Its default system prompt is the chat template's own (no system message is written).
- "none" (prompting only, no labels): BOS + the turns' texts joined by newlines, which a plain
  language model continues.
System prompts: None = the template's default (LLASM_SYSTEM for the two LLaSM templates, the chat
template's own for "chat-template", none for "none"); "" = an empty one (LLaSM templates) or
none (a chat template writes its own default); any other text is written as the system prompt.
Which template a model prompts with by default: `default_template`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llasm_jax.errors import UserError

from llasm_jax.tokens import AU_END, AU_PATCH, AU_START, AUDIO, IGNORE, MARKERS  # noqa: F401 (templates' API)

LLASM_SYSTEM = ("You are a helpful language and speech assistant. You are able to understand the speech "
                "content that the user provides, and assist the user with a variety of tasks using natural "
                "language.")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# Stage 1: "transcribe this" instructions, picked by the clip's language.
TRANSCRIBE_EN = (
    "Transcribe the speech into text.",
    "Please transcribe this audio.",
    "What does the speaker say? Write it down word for word.",
    "Convert this recording to text.",
    "Write down exactly what is said in the audio.",
    "Please provide a transcript of this speech.",
    "Listen to the audio and transcribe it.",
    "Repeat what the speaker says, as text.",
)
TRANSCRIBE_ZH = (
    "请将这段语音转写成文字。",
    "请转录这段音频。",
    "这段语音说了什么？请逐字写下来。",
    "把这段录音转换成文字。",
    "请写出音频中说的内容。",
    "请给出这段语音的文字记录。",
    "听这段音频并把它转写出来。",
    "请把说话人说的话用文字写出来。",
)

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
          "developer": "system"}  # OpenAI's newer name of the system message
RAW = "none"  # no template: BOS + the turns' texts (a plain language model continues them)
CHAT_TEMPLATE = "chat-template"
LLASM_DEFAULT = "llasm-cllama2"  # a LLaSM whose tokenizer has no chat template and whose folder records none


def audio_span(p: int) -> str:
  """The text of one audio of P tokens: `<au_start>` + P x `<au_patch>` + `<au_end>`."""
  return AU_START + AU_PATCH * p + AU_END


def asr_messages(text: str, language: str, rng: np.random.Generator) -> list[dict[str, str]]:
  """Stage-1 conversation for one (audio, transcript): a "transcribe" instruction in the clip's
  language ("zh" -> Chinese, anything else -> English), randomly before or after the audio."""
  pool = TRANSCRIBE_ZH if language.lower().startswith("zh") else TRANSCRIBE_EN
  instruction = pool[int(rng.integers(len(pool)))]
  content = f"{instruction}\n{AUDIO}" if rng.random() < 0.5 else f"{AUDIO}\n{instruction}"
  return [{"role": "user", "content": content}, {"role": "assistant", "content": text}]


def check_text(text: str, where: str) -> None:
  """Raises ValueError if `text` spells an audio marker, which would inject fake audio tokens."""
  for m in MARKERS:
    if m in text:
      raise UserError(f"{where}: text contains the audio marker {m!r}; remove it (audio is marked with {AUDIO!r})")


def _normalise(messages: Sequence[dict[str, Any]]) -> tuple[str | None, list[tuple[str, str]]]:
  """messages -> (the system message's content or None, [(role, content)] of the other turns)."""
  system, out = None, []
  for i, m in enumerate(messages):
    role = _ROLES.get(str(m.get("role", m.get("from", ""))).lower())
    if role is None:
      raise UserError(f"message {i}: role {m.get('role', m.get('from'))!r}; expected user/human, "
                       "assistant/gpt, or system (first)")
    content = m.get("content", m.get("value", ""))
    if not isinstance(content, str):
      raise UserError(f"message {i}: content should be a string, got {type(content).__name__}")
    check_text(content, f"message {i}")
    if role != "user" and AUDIO in content:
      raise UserError(f"message {i}: a {role} message holds {AUDIO!r}; audio belongs to user turns")
    if role == "system":
      if i != 0:
        raise UserError(f"message {i}: a system message must come first (it sets the conversation's system "
                         "prompt); move it to the front or drop it")
      system = content
      continue
    out.append((role, content))
  return system, out


def _expand(content: str, audio_tokens: Sequence[int], next_audio: int) -> tuple[str, int]:
  """`content` with its k-th `<audio>` written as the span of audio `next_audio + k`."""
  parts = content.split(AUDIO)
  if next_audio + len(parts) - 1 > len(audio_tokens):
    raise UserError(f"the messages hold more {AUDIO!r} placeholders than the {len(audio_tokens)} audios given")
  text = parts[0]
  for k, part in enumerate(parts[1:]):
    text += audio_span(int(audio_tokens[next_audio + k])) + part
  return text, next_audio + len(parts) - 1


class Template:
  """messages + audio token counts -> (input_ids int32[T], labels int32[T]).

  `system`: the system prompt of every conversation that has no system message; None = the
  template's default (`default_system`)."""

  name = ""
  default_system: str | None = None

  def __init__(self, tokenizer, system: str | None = None):
    self.tokenizer = tokenizer
    self.system = self.default_system if system is None else system
    self._markers_checked = False  # text-only LLMs have no audio tokens: checked once audio shows up

  def _enc(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False)

  def encode(self, messages: Sequence[dict[str, Any]], audio_tokens: Sequence[int] = (),
             ) -> tuple[np.ndarray, np.ndarray]:
    system, turns = _normalise(messages)
    if len(audio_tokens) and not self._markers_checked:
      check_tokenizer_markers(self.tokenizer)
      self._markers_checked = True
    ids, labels = self._encode(self.system if system is None else system, turns, list(audio_tokens))
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)

  def _encode(self, system: str | None, turns, audio_tokens):
    raise NotImplementedError

  def fixed_prefix(self) -> np.ndarray:
    """int32[P]: the ids every conversation starts with, whatever its first user turn says (the
    system block and the opening of that turn): the longest common prefix of a few conversations
    whose first turns begin differently (an audio, a word, a digit, CJK). Training can compute it
    once for a whole batch (`config.data.shared_prefix`), a server for every request. A tokenizer
    without the audio tokens (a text-only LLM) is probed with text alone."""
    probes = [("Hello there.", []), ("7 days", []), ("你好", []), ("(x)", [])]
    if all(len(self.tokenizer.encode(m, add_special_tokens=False)) == 1 for m in MARKERS):
      probes.insert(0, (AUDIO, [1]))
    rendered = [self.encode([{"role": "user", "content": c}, {"role": "assistant", "content": "ok"}], a)[0]
                for c, a in probes]
    n = min(len(r) for r in rendered)
    same = np.all([r[:n] == rendered[0][:n] for r in rendered], axis=0)
    return rendered[0][:int(np.argmin(same)) if not same.all() else n]


class LlasmCllama2(Template):
  name = "llasm-cllama2"
  default_system = LLASM_SYSTEM

  def _encode(self, system, turns, audio_tokens):
    tok = self.tokenizer
    system_block = B_SYS + system + E_SYS
    ids = self._enc(system_block)
    labels = [IGNORE] * len(ids)
    used, first_user = 0, True
    for i, (role, content) in enumerate(turns):
      if role == "user":
        content, used = _expand(content, audio_tokens, used)
        if first_user:
          content, first_user = system_block + content, False  # the released quirk: system text twice
        piece = [tok.bos_token_id] + self._enc(f"{B_INST} {content} {E_INST} ")
        ids += piece
        labels += [IGNORE] * len(piece)
      else:
        if not content and i == len(turns) - 1:
          break  # generation slot
        piece = self._enc(f"{content} ") + [tok.eos_token_id]
        ids += piece
        labels += piece
    _check_used(used, audio_tokens)
    return ids, labels


class LlasmBaichuan(Template):
  name = "llasm-baichuan"
  default_system = LLASM_SYSTEM

  def _encode(self, system, turns, audio_tokens):
    tok = self.tokenizer
    ids = [tok.bos_token_id] + self._enc(system)
    labels = [IGNORE] * len(ids)
    used = 0
    for i, (role, content) in enumerate(turns):
      if role == "user":
        content, used = _expand(content, audio_tokens, used)
        piece = self._enc("USER:") + self._enc(content)
        ids += piece
        labels += [IGNORE] * len(piece)
      else:
        head = self._enc("ASSISTANT:")
        ids += head
        labels += [IGNORE] * len(head)
        if not content and i == len(turns) - 1:
          break  # generation slot: the prompt ends with "ASSISTANT:"
        reply = self._enc(content + tok.eos_token)
        ids += reply
        labels += reply
    _check_used(used, audio_tokens)
    return ids, labels


class ChatTemplate(Template):
  name = CHAT_TEMPLATE

  def __init__(self, tokenizer, system: str | None = None):
    super().__init__(tokenizer, system)
    if not getattr(tokenizer, "chat_template", None):
      raise UserError("template 'chat-template': the tokenizer has no chat_template; pick 'llasm-cllama2' "
                       "or 'llasm-baichuan', or load a tokenizer that ships one")
    if not getattr(tokenizer, "is_fast", False):
      raise UserError("template 'chat-template' needs a fast tokenizer (character offsets for the labels)")

  def _render(self, messages, generation_prompt: bool) -> str:
    return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

  def _encode(self, system, turns, audio_tokens):
    # No system message (None or ""): the chat template writes its own default, if it has one.
    messages = [{"role": "system", "content": system}] if system else []
    spans, used = [], 0
    for i, (role, content) in enumerate(turns):
      if role == "user":
        content, used = _expand(content, audio_tokens, used)
      elif not content and i == len(turns) - 1:
        break
      else:
        # The assistant's characters: what it adds beyond the prompt that asks for it.
        start = len(self._render(messages, True))
        messages.append({"role": role, "content": content})
        end = len(self._render(messages, False))
        spans.append((start, end))
        continue
      messages.append({"role": role, "content": content})
    generation = bool(turns) and turns[-1][0] == "assistant" and not turns[-1][1]
    text = self._render(messages, generation)
    for start, end in spans:
      if end > len(text):
        raise UserError("the tokenizer's chat template does not render a conversation as an extension of its "
                         "prefix; labels cannot be placed, use another template")
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for k, (a, _) in enumerate(enc["offset_mapping"]):
      if any(start <= a < end for start, end in spans):
        labels[k] = ids[k]
    _check_used(used, audio_tokens)
    return ids, labels


class Raw(Template):
  """No template, for prompting a plain language model: BOS + the turns' texts (a system prompt
  first, when one is given) joined by newlines, tokenized as one text. No labels: training
  takes one of TEMPLATES."""

  name = RAW

  def _encode(self, system, turns, audio_tokens):
    texts, used = ([system] if system else []), 0
    for role, content in turns:
      if role == "user":
        content, used = _expand(content, audio_tokens, used)
      if content:
        texts.append(content)
    _check_used(used, audio_tokens)
    ids = self.tokenizer.encode("\n".join(texts), add_special_tokens=True)
    return ids, [IGNORE] * len(ids)


TEMPLATES = {t.name: t for t in (LlasmCllama2, LlasmBaichuan, ChatTemplate)}  # what training takes
PROMPT_TEMPLATES = {**TEMPLATES, RAW: Raw}  # what prompting takes


def get_template(name: str, tokenizer, system: str | None = None) -> Template:
  """The template `name` (one of PROMPT_TEMPLATES) over `tokenizer`; `system` as `Template`."""
  if name not in PROMPT_TEMPLATES:
    raise UserError(f"template {name!r}: expected one of {', '.join(PROMPT_TEMPLATES)}")
  return PROMPT_TEMPLATES[name](tokenizer, system)


def has_chat_template(tokenizer) -> bool:
  """Whether `tokenizer` ships a chat template (and so prompts with it by default)."""
  return bool(getattr(tokenizer, "chat_template", None))


def default_template(tokenizer, is_llasm: bool, recorded: dict[str, Any] | None = None, *,
                     template: str | None = None, system: str | None = None) -> tuple[str, str | None]:
  """The (template name, system prompt) a model prompts with: the one owner of that choice.

  Template: `template` (the user's) > `recorded["template"]` (the model folder's record of what
  it was trained with) > "chat-template" when the tokenizer has a chat template > "llasm-cllama2"
  for a LLaSM, "none" for a text-only LLM. System prompt: `system` (the user's) > the record's,
  when the record's template is the one chosen > None (the template's own default, see `Template`).
  """
  recorded = recorded or {}
  chosen = recorded.get("template")
  if template:
    name = template
  elif chosen:
    name = chosen
  elif tokenizer is not None and has_chat_template(tokenizer):
    name = CHAT_TEMPLATE
  else:
    name = LLASM_DEFAULT if is_llasm else RAW
  if name not in PROMPT_TEMPLATES:
    where = "" if template else " (recorded in the model folder's llasm_jax.json)"
    raise UserError(f"template {name!r}{where}: expected one of {', '.join(PROMPT_TEMPLATES)}")
  if system is None and chosen == name:
    system = recorded.get("system")
  return name, system


def _check_used(used: int, audio_tokens: Sequence[int]) -> None:
  if used != len(audio_tokens):
    raise UserError(f"{len(audio_tokens)} audios given but the messages hold {used} {AUDIO!r} placeholders")


def check_tokenizer_markers(tokenizer, expected: dict[str, int] | None = None) -> dict[str, int]:
  """Ids of `<au_patch>`, `<au_start>`, `<au_end>` in `tokenizer`; raises if one is missing, is not
  a single token, or differs from `expected` (the ids of the model config)."""
  ids = {}
  for m in MARKERS:
    got = tokenizer.encode(m, add_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(m)
    if len(got) != 1 or got[0] != tid or tid == tokenizer.unk_token_id:
      raise UserError(f"tokenizer: {m!r} is not one token (got {got}); add the audio tokens with "
                       f"tokenizer.add_tokens({list(MARKERS)}, special_tokens=True)")
    ids[m] = tid
  if expected is not None:
    for m, tid in ids.items():
      if expected.get(m, tid) != tid:
        raise UserError(f"tokenizer maps {m!r} to {tid} but the model config expects {expected[m]}; "
                         "use the tokenizer that was saved with the checkpoint")
  return ids


def audio_spans(ids: np.ndarray, start_id: int, end_id: int) -> list[tuple[int, int]]:
  """[(start, end)) of every `<au_start>...<au_end>` span of int[T] `ids`, in order."""
  starts = np.flatnonzero(ids == start_id)
  ends = np.flatnonzero(ids == end_id)
  return [(int(s), int(e) + 1) for s, e in zip(starts, ends)]
