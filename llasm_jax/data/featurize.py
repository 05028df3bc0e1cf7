"""Per-sample featurize: a record (+ rng) -> one sample's token ids, labels and audio slots (run in the grain
workers; picklable, state built lazily). The samples' shapes and the batch they make: llasm_jax/data/contract.py."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from llasm_jax.data import prompts, templates
from llasm_jax.data.contract import PipelineConfig
from llasm_jax.data.sources import NO_TRANSCRIPTS, record_audios, record_kind, to_str
from llasm_jax.errors import UserError
from llasm_jax.tokens import IGNORE, LOAD_LOCK, load_tokenizer

log = logging.getLogger(__name__)


def ctc_token_ids(tok, text: str) -> list[int]:
  """`text` in the tokens it has in the middle of a sentence (after a word and a space), as the
  LLM reads it in a prompt or an answer: with the space that BPE vocabularies (GPT-2 / SmolLM2 'Ġ')
  fold into the first word, and no second one where SentencePiece adds its own ('▁'). The
  anchor's tokens are cut off; where they merge with the text, the text alone is tokenized."""
  anchor = tok.encode("a", add_special_tokens=False)
  ids = tok.encode("a " + text.strip(), add_special_tokens=False)
  if ids[:len(anchor)] == anchor:
    return ids[len(anchor):]
  return tok.encode(text.strip(), add_special_tokens=False)


def audio_slots(audios: Sequence[np.ndarray], cfg: PipelineConfig) -> tuple[list[int], list[np.ndarray]]:
  """Audios -> slots: windows per audio and the log-mel float32[M, F_j] of each slot
  (`prompts.AudioPrompts.windows`: one slot per audio in "llasm" mode, one per `mel_frames`
  window in "encoder" mode). `data encode` calls this too, so cached slots are these slots."""
  owner = prompts.AudioPrompts.of(cfg)
  per_audio = [owner.windows(a) for a in audios]
  return [len(w) for w in per_audio], [m for w in per_audio for m in w]


class Featurize:
  """record (+ rng) -> one sample: input_ids/labels int32[n] and the audio slots kept, as
  mel float32[a, M, F] + mel_lengths int32[a], or (cached datasets) audio_features [sum of S_j, E]
  + audio_feature_lengths int32[a] (the slots' features back to back, unpadded); with
  `cfg.teacher` also teacher_input_ids/teacher_labels int32[m] (m = 0: no teacher for this record)."""

  def __init__(self, cfg: PipelineConfig, tokenizer, kind: str):
    self.cfg, self.tokenizer, self.kind = cfg, tokenizer, kind
    self.audio = prompts.AudioPrompts.of(cfg)  # audio -> windows -> marker spans
    self._template = None
    self._prefix = None
    self._truncated = 0
    self._untaught = 0

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_template"] = None  # rebuilt in each worker
    return state

  @property
  def template(self) -> templates.Template:
    if self._template is None:
      tok = load_tokenizer(self.tokenizer)
      with LOAD_LOCK:
        templates.check_tokenizer_markers(tok, {templates.AU_PATCH: self.cfg.audio_patch_id,
                                                templates.AU_START: self.cfg.audio_start_id,
                                                templates.AU_END: self.cfg.audio_end_id})
        self._template = templates.get_template(self.cfg.template, tok, self.cfg.system)
    return self._template

  def messages(self, record: dict[str, Any], rng: np.random.Generator) -> list[dict]:
    """The conversation, with `<audio>` placeholders."""
    if record_kind(record, self.kind) == "asr":
      return templates.asr_messages(to_str(record["text"]), to_str(record["language"]), rng)
    roles = ("user", "assistant")
    return [{"role": roles[int(r)], "content": to_str(v)} for r, v in zip(record["roles"], record["values"])]

  def spoken(self, record: dict[str, Any]) -> list[str]:
    """What each audio of `record` says, in order (ASR: the transcript; instructions: the
    record's `transcripts`); "" where unknown."""
    if record_kind(record, self.kind) == "asr":
      return [to_str(record["text"])]
    if "transcripts" not in record:
      raise UserError(f"record {to_str(record.get('id', '?'))!r}: the dataset {NO_TRANSCRIPTS}")
    return [to_str(t) for t in record["transcripts"]]

  def ctc_labels(self, record: dict[str, Any], windows: Sequence[int], kept: int) -> np.ndarray:
    """int32[u]: the transcripts of the audios whose `windows` (slots per audio) the sample
    keeps in its first `kept` slots, back to back in the LLM's tokens; empty when an audio among
    them has no known text or is kept only in part (its frames would have no text)."""
    bounds = np.cumsum([0] + list(windows))
    if kept not in bounds:
      return np.zeros(0, np.int32)
    texts = self.spoken(record)[:int(np.searchsorted(bounds, kept))]
    if not all(t.strip() for t in texts):
      return np.zeros(0, np.int32)
    tok = self.template.tokenizer
    return np.int32([i for t in texts for i in ctc_token_ids(tok, t)]).reshape(-1)

  def teacher_messages(self, record: dict[str, Any], msgs: list[dict]) -> list[dict] | None:
    """`msgs` as the distillation teacher reads them: each `<audio>` replaced by the text that
    audio speaks (`spoken`). None when an audio's text is unknown (an empty transcript)."""
    spoken = self.spoken(record)
    holders = sum(m["content"].count(templates.AUDIO) for m in msgs)
    if holders != len(spoken):
      raise UserError(f"record {to_str(record.get('id', '?'))!r}: {len(spoken)} transcripts for {holders} "
                       f"{templates.AUDIO!r} placeholders; build the dataset again with `llasm-jax data build`")
    if not all(spoken):
      return None
    return _fill_placeholders(msgs, spoken)

  def _teacher(self, record: dict[str, Any], msgs: list[dict] | None, ids: np.ndarray,
               labels: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher's ids/labels int32[m], cut at seq_len; checks its answer tokens are the student's."""
    if msgs is None:
      self._untaught += 1
      if self._untaught <= 5 or self._untaught % 1000 == 0:
        log.warning("record %r: an audio has no known text (an explicit <audio> placeholder), so the "
                    "distillation teacher skips it; %d such records so far in this process",
                    to_str(record.get("id", "?")), self._untaught)
      empty = np.zeros(0, np.int32)
      return {"teacher_input_ids": empty, "teacher_labels": empty}
    t_ids, t_labels = self.template.encode(msgs, [])
    if not np.array_equal(ids[labels != IGNORE], t_ids[t_labels != IGNORE]):
      raise UserError(f"record {to_str(record.get('id', '?'))!r}: the distillation teacher's answer tokens differ "
                       f"from the student's under template {self.cfg.template!r} (the text before the answer "
                       "changes how it tokenizes); use the llasm-cllama2 template or config.train.loss='ce'")
    n = self.cfg.seq_len
    return {"teacher_input_ids": t_ids[:n], "teacher_labels": t_labels[:n]}

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    cfg = self.cfg
    msgs = self.messages(record, rng)
    teacher_msgs = self.teacher_messages(record, msgs) if cfg.teacher else None
    if cfg.features == "cached":
      # What `audio_slots` gave when the dataset was encoded: windows per audio, mel frames per slot.
      frames = record["mel_lengths"].tolist()
      windows = record["slots"].tolist()
      ids, labels = self.audio.encode_windows(self.template, msgs, windows, frames)
    else:
      windows, mels = audio_slots(record_audios(record, self.kind), cfg)  # what `self.audio.encode` does
      frames = [m.shape[1] for m in mels]
      ids, labels = self.audio.encode_windows(self.template, msgs, windows, frames)
    extra = self._teacher(record, teacher_msgs, ids, labels) if cfg.teacher else {}
    ids, labels, kept = self._fit(ids, labels)
    if cfg.ctc:
      extra["ctc_labels"] = self.ctc_labels(record, windows, kept)
    if cfg.shared_prefix:
      ids, labels, extra["prefix_ids"] = self._strip_prefix(ids, labels)
    if cfg.features == "cached":
      lengths = record["feature_lengths"][:kept].astype(np.int32)
      return {"input_ids": ids, "labels": labels, "audio_features": record["features"][:int(lengths.sum())],
              "audio_feature_lengths": lengths, **extra}
    mel = np.zeros((kept, cfg.num_mel_bins, cfg.frames), np.float32)
    for j in range(kept):
      mel[j, :, :frames[j]] = mels[j]
    return {"input_ids": ids, "labels": labels, "mel": mel, "mel_lengths": np.int32(frames[:kept]), **extra}

  def _strip_prefix(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels) after the template's fixed prefix, and the prefix int32[P]."""
    if self._prefix is None:
      self._prefix = np.asarray(self.template.fixed_prefix(), np.int32)
    p = len(self._prefix)
    # The first token after the prefix must not be a target: its prediction is made inside the prefix.
    if len(ids) <= p or not np.array_equal(ids[:p], self._prefix) or (labels[:p + 1] != IGNORE).any():
      raise UserError(f"config.data.shared_prefix: a sample does not start with the template's fixed prefix of "
                       f"{p} tokens followed by a prompt token; set config.data.shared_prefix=False for the "
                       f"{self.cfg.template!r} template")
    return ids[p:], labels[p:], self._prefix

  def _fit(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    cfg = self.cfg
    spans = templates.audio_spans(ids, cfg.audio_start_id, cfg.audio_end_id)
    kept = 0
    while kept < len(spans) and kept < cfg.max_audios and spans[kept][1] <= cfg.seq_len:
      kept += 1
    cut = min(cfg.seq_len, spans[kept][0] if kept < len(spans) else len(ids))
    if cut < len(ids):
      self._truncated += 1
      if self._truncated <= 5 or self._truncated % 1000 == 0:
        log.warning("sample of %d tokens and %d audios cut to %d tokens and %d audios (seq_len %d, "
                    "max_audios %d; %d cut so far in this process)", len(ids), len(spans), cut, kept,
                    cfg.seq_len, cfg.max_audios, self._truncated)
    return ids[:cut], labels[:cut], kept


def _fill_placeholders(msgs: list[dict], fills: Sequence[str]) -> list[dict]:
  """`msgs` with the k-th `<audio>` of the conversation replaced by fills[k]."""
  out, k = [], 0
  for m in msgs:
    parts = m["content"].split(templates.AUDIO)
    text = parts[0]
    for part in parts[1:]:
      text += fills[k] + part
      k += 1
    out.append({**m, "content": text})
  return out
