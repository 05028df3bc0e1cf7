"""A source's rows as the builders and the synth read them: JSON / JSONL row by row (a broken line is
one bad row), why a row is skipped, and the accepted shape of an instructions conversation.

Instructions (LLaSM-Audio-Instructions style): a JSON array or JSONL of {"id", "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}. Audio is given either per human turn (`"audio": path or [paths]` inside the turn) or per sample
(`"audio": path or [paths]` next to "conversations"), not both. A `<audio>` placeholder in
a human value marks where each audio goes (in order). Without placeholders, audio given
per turn replaces that turn's text (a spoken turn: its text was the transcript of the
speech), and a per-sample list must hold one audio per human turn, each replacing that
turn's text. Turns must alternate human/gpt, start with human and end with gpt.
The replaced texts are kept as `transcripts`, one per audio in order: what the distillation
loss's teacher reads in place of the audio (config.train.loss "kd" / "mix"). An audio marked
by an explicit `<audio>`, or one of several audios replacing one turn's text (which cannot
be split among them), has no known text: "".
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from llasm_jax.errors import UserError
from llasm_jax.tokens import AUDIO, MARKERS


class BuildError(UserError):
  """The build as a whole cannot go on (unreadable manifest, too many bad rows)."""


class Skip(Exception):
  """One row that is not used; `reason` is the short code it is counted under."""

  def __init__(self, reason: str, message: str, file: str = ""):
    self.reason, self.message, self.file = reason, message, file
    super().__init__(message)

  def __reduce__(self):  # crosses process boundaries from the build workers
    return Skip, (self.reason, self.message, self.file)


@dataclasses.dataclass
class Row:
  """One unit of the source: `where` says where it came from (file:line), `data` what it holds,
  or `error` why it could not even be parsed."""

  index: int
  where: str
  data: dict[str, Any] | None = None
  error: str | None = None


def read_text(path: str, what: str) -> str:
  """The UTF-8 text of `path`; BuildError naming `what` where it is missing or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise BuildError(f"{what} {path!r} not found; check the path") from None
  except (OSError, UnicodeDecodeError) as e:
    raise BuildError(f"{what} {path!r} cannot be read ({e}); it must be UTF-8 text") from None


def json_rows(path: str, what: str) -> list[Row]:
  """A JSON array or JSONL file -> rows; a broken JSONL line is a row with an error, a broken
  JSON array is a BuildError (nothing in it can be trusted)."""
  text = read_text(path, what)
  name = os.path.basename(path)
  if text.lstrip().startswith("["):
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:
      raise BuildError(f"{what} {path!r} is not valid JSON ({e}); fix it or write one JSON object per line") from None
    return [Row(i, f"{name}[{i}]", item if isinstance(item, dict) else None,
                None if isinstance(item, dict) else f"expected a JSON object, got {type(item).__name__}")
            for i, item in enumerate(items)]
  rows = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    where = f"{name}:{lineno}"
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      rows.append(Row(len(rows), where, error=f"malformed JSON ({e})"))
      continue
    if not isinstance(item, dict):
      rows.append(Row(len(rows), where, error=f"expected a JSON object, got {type(item).__name__}"))
      continue
    rows.append(Row(len(rows), where, item))
  return rows


def resolve(path: Any, root: str) -> str:
  """`path` as given if absolute, else under `root`."""
  return path if os.path.isabs(path) else os.path.join(root, path)


def _as_list(value: Any, what: str) -> list[str]:
  if isinstance(value, str):
    return [value]
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return list(value)
  raise Skip("bad_row", f"{what} should be a path or a list of paths")


def parse_conversation(item: dict[str, Any], root: str) -> dict[str, Any]:
  """One instructions JSON object -> {"id", "roles", "values" (with `<audio>` placeholders),
  "audio_paths", "transcripts" (per audio: the text it replaced, "" if unknown), "language"};
  raises Skip("bad_row") if it does not follow the accepted shape."""
  conv = item.get("conversations")
  if not isinstance(conv, list) or not conv:
    raise Skip("bad_row", "no 'conversations' list")
  per_sample = item.get("audio")
  roles, values, turn_audio = [], [], []
  for k, turn in enumerate(conv):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      raise Skip("bad_row", f"turn {k}: expected {{'from': ..., 'value': str}}")
    role = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}.get(str(turn.get("from", "")).lower())
    if role is None:
      raise Skip("bad_row", f"turn {k}: 'from' is {turn.get('from')!r}; expected human or gpt")
    if role != k % 2:
      raise Skip("bad_row", f"turn {k}: turns must alternate human, gpt, human, ... starting with human")
    for m in MARKERS:
      if m in turn["value"]:
        raise Skip("bad_text", f"turn {k}: text contains the audio marker {m!r}")
    if role == 1 and (AUDIO in turn["value"] or "audio" in turn):
      raise Skip("bad_row", f"turn {k}: a gpt turn holds audio; audio belongs to human turns")
    turn_audio.append(_as_list(turn["audio"], f"turn {k} 'audio'") if "audio" in turn else [])
    roles.append(role)
    values.append(turn["value"])
  if roles[-1] != 1:
    raise Skip("bad_row", "the conversation does not end with a gpt reply")
  if per_sample is not None and any(turn_audio):
    raise Skip("bad_row", "audio given both per turn and per sample; use one of them")
  paths: list[str] = []
  transcripts: list[str] = []
  if per_sample is not None:
    listed = _as_list(per_sample, "'audio'")
    n_placeholders = sum(v.count(AUDIO) for v in values)
    human = [k for k, r in enumerate(roles) if r == 0]
    if n_placeholders:
      if n_placeholders != len(listed):
        raise Skip("bad_row", f"{len(listed)} audio files for {n_placeholders} {AUDIO} placeholders")
      transcripts = [""] * len(listed)
    elif len(listed) == len(human):
      for k in human:
        transcripts.append(values[k])
        values[k] = AUDIO
    else:
      raise Skip("bad_row", f"{len(listed)} audio files for {len(human)} human turns and no {AUDIO} "
                 "placeholders; give one audio per human turn or mark each with <audio>")
    paths = listed
  else:
    for k, audios in enumerate(turn_audio):
      if not audios:
        continue
      n = values[k].count(AUDIO)
      if n == 0:
        transcripts += [values[k]] if len(audios) == 1 else [""] * len(audios)
        values[k] = "\n".join([AUDIO] * len(audios))  # a spoken turn: the audio is the message
      elif n != len(audios):
        raise Skip("bad_row", f"turn {k}: {len(audios)} audio files for {n} {AUDIO} placeholders")
      else:
        transcripts += [""] * len(audios)
      paths += audios
    if sum(v.count(AUDIO) for v in values) != len(paths):
      raise Skip("bad_row", f"{AUDIO} placeholders without audio files")
  if not paths:
    raise Skip("bad_row", "no audio in the conversation")
  lang = item.get("language", "")
  return {"id": str(item.get("id", "")), "roles": roles, "values": values,
          "audio_paths": [resolve(p, root) for p in paths], "transcripts": transcripts,
          "language": lang if isinstance(lang, str) else ""}
