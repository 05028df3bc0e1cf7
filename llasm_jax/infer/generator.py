"""The inference API the CLI wraps: load a model folder once, then generate text from text, audio or conversations.

    gen = Generator.load("ckpt/")                       # or mesh=..., rules=... to shard
    [result] = gen.generate(["What is said here?"], audios=[["a.wav"]], max_new_tokens=64)
    result.text, result.token_ids, result.prompt_token_ids, result.timings

A prompt is a string (one user message), a list of messages (a conversation, as in
`llasm_jax.data.templates`, optionally opening with a system message), or token ids (audio
spans already written). Audios are paths, float32[N] waveforms at 16 kHz, or log-mel features
float32[M, F]. `prepare` turns one prompt and its audios into what the engine takes.

The prompt format (`templates.default_template`): the template and system prompt passed here >
the ones the model folder records (what it was trained with) > the tokenizer's chat template,
with the chat template's own system prompt > llasm-cllama2 (a LLaSM) or none (a text-only LLM).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from llasm_jax import checkpoint
from llasm_jax.data import templates
from llasm_jax.data.prompts import AudioPrompts, conversation, user_content
from llasm_jax.infer.engine import Engine
from llasm_jax.quantize import quantize as quantize_model
from llasm_jax.infer.sampling import SamplingParams
from llasm_jax.errors import UserError

RAW = templates.RAW  # no template: BOS + the prompt text


@dataclasses.dataclass
class Result:
  """One reply. token_ids: generated ids (EOS included when it stopped there); timings: of the
  whole batch it was generated in (seconds, plus decode_tokens_per_s)."""

  text: str
  token_ids: list[int]
  prompt_token_ids: list[int]
  finish_reason: str  # "eos", "stop" (a stop string) or "length"
  timings: dict[str, float]

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def checkpoint_eos_ids(folder: str, llm_cfg, tokenizer) -> list[int]:
  """Every end id the checkpoint names: Llama 3 lists several in its generation config."""
  ids = [llm_cfg.eos_token_id]
  for name, key in (("generation_config.json", "eos_token_id"), ("hf_llm_config.json", "eos_token_id")):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with open(path) as f:
        value = json.load(f).get(key)
      ids += value if isinstance(value, list) else [] if value is None else [value]
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    ids.append(tokenizer.eos_token_id)
  return list(dict.fromkeys(int(i) for i in ids))


class Generator:
  """A loaded model, its tokenizer and prompt format; `generate` may be called any number of
  times (each (batch, length) bucket compiles once).

  template / system: the prompt format asked for (None: see the module docstring); recorded:
  the model folder's {"template", "system"} (`checkpoint.prompt_record`). `template_name` and
  `system` are the format chosen (system None: the template's own default)."""

  def __init__(self, engine: Engine, tokenizer=None, *, template: str | None = None, system: str | None = None,
               folder: str = "", recorded: dict[str, Any] | None = None):
    self.engine = engine
    self.tokenizer = tokenizer
    self.folder = folder
    self.cfg = engine.audio_cfg  # LlasmConfig, or None for a text-only LLM
    self.audio = AudioPrompts.of(self.cfg)  # audio -> windows -> marker spans
    self.recorded = dict(recorded or {})
    self._asked = (template, system)
    self.template_name, self.system = self.prompt_format()
    self._templates: dict[tuple[str, str | None], templates.Template] = {}
    if tokenizer is not None and self.cfg is not None:
      templates.check_tokenizer_markers(tokenizer, {
          templates.AU_PATCH: self.cfg.audio_patch_id, templates.AU_START: self.cfg.audio_start_id,
          templates.AU_END: self.cfg.audio_end_id})

  @classmethod
  def load(cls, folder: str, *, mesh=None, rules=None, template: str | None = None, system: str | None = None,
           quantize: str = "none", **run) -> "Generator":
    """Restores `folder` (a `llasm-jax convert`/`train` output) onto one device, or onto `mesh`
    sharded by `rules`; `run` sets run-time model fields (dtype, scan_layers, attention_impl).
    quantize: "int8" stores the LLM's projection kernels int8 (`llasm_jax.quantize`)."""
    folder = os.fspath(folder)
    meta = checkpoint.read_meta(folder)
    if meta["kind"] == "whisper":
      raise UserError(f"--ckpt {folder!r} holds Whisper alone; generation needs a 'llasm' or 'llama' "
                       "checkpoint (convert with --llm, and --whisper for audio)")
    local = checkpoint.companions(folder)  # tokenizer and configs; a bucket's are downloaded
    tokenizer = None
    if any(os.path.exists(os.path.join(local, f)) for f in ("tokenizer.json", "tokenizer.model")):
      from transformers import AutoTokenizer

      tokenizer = AutoTokenizer.from_pretrained(local)
    model, _ = checkpoint.load_model(folder, mesh=mesh, rules=rules, **run)
    model = quantize_model(model, quantize)
    llm_cfg = model.llm.cfg if meta["kind"] == "llasm" else model.cfg
    engine = Engine(model, mesh=mesh, rules=rules, eos_ids=checkpoint_eos_ids(local, llm_cfg, tokenizer),
                    pad_id=None if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id)
    return cls(engine, tokenizer, template=template, system=system, folder=folder,
               recorded=checkpoint.prompt_record(meta))

  # ---- inputs ----------------------------------------------------------------------------

  def _need_tokenizer(self, what: str):
    if self.tokenizer is None:
      raise UserError(f"{what} needs a tokenizer, and {self.folder or 'this model'} has none "
                       "(tokenizer.json / tokenizer.model); pass token ids instead, or convert from a "
                       "folder that holds the tokenizer")

  def prompt_format(self, template: str | None = None, system: str | None = None) -> tuple[str, str | None]:
    """(template name, system prompt) of a prompt: `template` / `system` given here > those given
    at load > the folder's record > the tokenizer's chat template > the old defaults."""
    return templates.default_template(
        self.tokenizer, self.cfg is not None, self.recorded, template=template or self._asked[0],
        system=self._asked[1] if system is None else system)

  def template(self, name: str | None = None) -> templates.Template:
    """The template `name` (default: the generator's) with its system prompt, built once."""
    key = self.prompt_format(name)
    if key not in self._templates:
      self._need_tokenizer("a text prompt")
      self._templates[key] = templates.get_template(key[0], self.tokenizer, key[1])
    return self._templates[key]

  def features(self, audio) -> list[np.ndarray]:
    """One audio -> its log-mel features float32[M, F], one per 30 s window ("encoder" mode
    splits longer audio; "llasm" mode, as released, reads the first 30 s): `AudioPrompts.windows`."""
    return self.audio.windows(audio)

  def prepare(self, prompt, audios: Sequence[Any] | None = None,
              template: str | None = None) -> tuple[list[int], list[np.ndarray]]:
    """One prompt -> (its token ids, the log-mel float32[M, F] of every audio window in order):
    one row of `Engine.generate`'s (prompts, mels).

    prompt: a user's text (without `<audio>` placeholders, the audios go in front of it),
    messages ({"role": "system" (first) | "user" | "assistant", "content": ...}, `<audio>` where
    each audio goes; a generation slot is added unless the last is an assistant's), or token ids
    (audio spans already written: the audios only give their windows). audios: in placeholder
    order, paths, 16 kHz waveforms float32[N], log-mels float32[M, F] or lists of them (the
    windows of one audio). template: this prompt's (default: the generator's).
    """
    audios = list(audios or [])
    if not isinstance(prompt, str) and len(prompt) and isinstance(prompt[0], (int, np.integer)):
      return [int(t) for t in prompt], [w for a in audios for w in self.audio.windows(a)]
    fmt = self.template(template)
    ids, _, mels = self.audio.encode(fmt, conversation(prompt, len(audios)), audios)
    return ids.tolist(), mels

  def encode_prompt(self, prompt, mels: Sequence[Sequence[np.ndarray]], template: str | None = None) -> list[int]:
    """Token ids of one prompt whose audios have features `mels` (one list of windows per audio): `prepare`."""
    return self.prepare(prompt, mels, template)[0]

  # ---- generation ------------------------------------------------------------------------

  def generate(
      self,
      prompts: Sequence[Any],
      audios: Sequence[Sequence[Any]] | None = None,
      *,
      template: str | None = None,
      max_new_tokens: int = 256,
      temperature: float = 0.0,
      top_k: int = 0,
      top_p: float = 1.0,
      seed: int = 0,
      stop: Sequence[str] = (),
      stream: Callable[[int, str], None] | None = None,
  ) -> list[Result]:
    """Replies to each prompt (each made by `prepare`). audios: per prompt, a list of audios
    (paths, 16 kHz waveforms or mel features), in the order of the prompt's `<audio>`
    placeholders (a string prompt without placeholders gets them in front). stop: strings that
    end a reply (not included in its text). stream(row, text): called with each new piece of
    text as it is decoded."""
    if isinstance(prompts, (str, bytes)):
      raise UserError("prompts should be a list (one entry per prompt), got a single string")
    t_start = time.perf_counter()
    if audios is not None and len(audios) != len(prompts):
      raise UserError(f"{len(audios)} audio lists for {len(prompts)} prompts; pass one list (maybe empty) per prompt")
    rows = [self.prepare(p, a, template) for p, a in zip(prompts, audios or [[]] * len(prompts))]
    features_s = time.perf_counter() - t_start  # features and prompt ids
    ids, flat_mels = [r[0] for r in rows], [r[1] for r in rows]
    if stop or stream:
      self._need_tokenizer("stop strings and streaming")
    texts = _Texts(self, len(ids), list(stop), stream)
    outs, timings = self.engine.generate(
        ids, flat_mels if any(flat_mels) else None, max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        callback=texts.update if (stop or stream) else None,
        # Stop strings alone need no per-token look: 8 tokens per check, then trim.
        chunk_tokens=8 if stop and not stream else None)
    times = {"features_s": features_s, **timings.as_dict(), "total_s": time.perf_counter() - t_start}
    results = []
    for b, out in enumerate(outs):
      token_ids, text = texts.finish(b, out.token_ids)
      reason = "stop" if texts.hit[b] else out.finish_reason
      results.append(Result(text=text, token_ids=token_ids, prompt_token_ids=out.prompt_token_ids,
                            finish_reason=reason, timings=times))
    return results

  def decode(self, token_ids: Sequence[int]) -> str:
    if self.tokenizer is None:
      return ""
    return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


class _Texts:
  """Host-side text of each row while decoding: stop strings and streamed pieces."""

  def __init__(self, gen: Generator, rows: int, stop: list[str], stream):
    self.gen, self.stop, self.stream = gen, [s for s in stop if s], stream
    self.sent = [0] * rows  # characters already streamed
    self.hit = [False] * rows

  def _visible(self, text: str) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    cut = [text.index(s) for s in self.stop if s in text]
    return (text[:min(cut)], True) if cut else (text, False)

  def update(self, rows: list[list[int]]) -> list[bool]:
    flags = []
    for b, ids in enumerate(rows):
      text, hit = self._visible(self.gen.decode(ids))
      self.hit[b] = self.hit[b] or hit
      if self.stream is not None:
        # Hold back what could be the start of a stop string, or half of a multi-byte character.
        safe = len(text) if hit else len(text) - max(
            [k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        if text[:safe].endswith("\ufffd"):
          safe -= 1
        if safe > self.sent[b]:
          self.stream(b, text[self.sent[b]:safe])
          self.sent[b] = safe
      flags.append(hit)
    return flags

  def finish(self, b: int, ids: list[int]) -> tuple[list[int], str]:
    """The row's final token ids (cut where a stop string completed) and text (before it)."""
    text, hit = self._visible(self.gen.decode(ids))
    if hit:
      self.hit[b] = True
      # The shortest prefix of the tokens whose text already holds the stop string.
      n = next(n for n in range(1, len(ids) + 1) if self._visible(self.gen.decode(ids[:n]))[1])
      ids = ids[:n]
    if self.stream is not None and len(text) > self.sent[b]:
      self.stream(b, text[self.sent[b]:])
      self.sent[b] = len(text)
    return ids, text


class Chat:
  """A multi-turn conversation: each `send` adds a user turn (text and/or one audio), generates
  the reply and keeps it. Features are computed once per audio and Whisper runs once per audio
  (the engine remembers its embeddings); the LLM prefills the whole conversation each turn."""

  def __init__(self, generator: Generator, *, template: str | None = None):
    self.gen, self.template = generator, template
    self.messages: list[dict[str, str]] = []
    self.mels: list[list[np.ndarray]] = []  # per audio so far, its windows' log-mels

  def reset(self) -> None:
    self.messages, self.mels = [], []

  def send(self, text: str = "", audio=None, **generate_kw) -> Result:
    """Replies to `text` and/or `audio` (a path, a 16 kHz waveform or mel features); a failed
    turn (say, an undecodable file) leaves the conversation as it was."""
    if not text and audio is None:
      raise UserError("send text, audio, or both")
    new = [] if audio is None else [self.gen.features(audio)]
    messages = self.messages + [{"role": "user", "content": user_content(text, len(new))}]
    mels = self.mels + new
    ids, flat = self.gen.prepare(messages, mels, self.template)
    [result] = self.gen.generate([ids], [flat], **generate_kw)
    self.messages = messages + [{"role": "assistant", "content": result.text}]
    self.mels = mels
    return result
