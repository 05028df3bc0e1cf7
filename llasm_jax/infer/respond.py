"""`llasm-jax data respond`: a model's own answers to text conversations ("behavior alignment").

BLSP-style speech training needs targets that the frozen LLM would give to the same question
typed: this writes them. Input: conversations in the LLaVA / ShareGPT shape (JSON array or
JSONL, `{"id", "conversations": [{"from": "human"|"gpt", "value": ...}]}`), or a text file with
one question per line. Every assistant turn (and a missing last one) is replaced by the model's
greedy reply to the conversation before it, with earlier replies already replaced, so a
multi-turn conversation stays the model's own. Rows are batched by turn; output is JSONL in the
input's shape, with the source rows' other fields kept.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from tqdm import tqdm

from llasm_jax import paths
from llasm_jax.data import templates
from llasm_jax.errors import UserError

_HUMAN = ("human", "user")


def read_conversations(path: str) -> list[dict[str, Any]]:
  """Conversations from a JSON array, JSONL, or a text file of one question per line."""
  text = paths.resolve(path).read_text()
  stripped = text.lstrip()
  if stripped.startswith("["):
    rows = json.loads(text)
  elif stripped.startswith("{"):
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise UserError(f"{path}:{n}: not a JSON object ({e.msg}); expected one conversation per line") from e
  else:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rows = [{"id": f"q{i:06d}", "conversations": [{"from": "human", "value": q}]} for i, q in enumerate(lines)]
  for i, row in enumerate(rows):
    turns = row.get("conversations") if isinstance(row, dict) else None
    if not turns or not isinstance(turns, list):
      raise UserError(f"{path}: row {i} has no 'conversations' list; expected "
                       '{"id": ..., "conversations": [{"from": "human", "value": ...}, ...]}')
    if any(templates.AUDIO in str(t.get("value", "")) for t in turns):
      raise UserError(f"{path}: row {i} ({row.get('id', '?')}) holds {templates.AUDIO}; respond reads text "
                       "conversations (run it before `data synth` turns the human turns into speech)")
  return rows


def _role(turn: dict) -> str:
  return "user" if turn.get("from", turn.get("role")) in _HUMAN else "assistant"


def _slots(row: dict) -> list[int]:
  """Indices of the assistant turns to write: each one after a human turn, plus one at the end."""
  turns = row["conversations"]
  slots = [i for i, t in enumerate(turns) if _role(t) == "assistant" and i > 0 and _role(turns[i - 1]) == "user"]
  if _role(turns[-1]) == "user":
    slots.append(len(turns))
  return slots


def respond(generator, rows: Sequence[dict[str, Any]], *, template: str | None = None, system: str | None = None,
            max_new_tokens: int = 128, batch_size: int = 16, progress: bool = True) -> list[dict[str, Any]]:
  """The rows with every assistant turn written by `generator` (greedy); see the module docstring.

  `template` / `system`: the prompt format (default: the generator's, `Generator.prompt_format`);
  system "" leaves the system prompt to the template (a chat template's own default).
  """
  name, system = generator.prompt_format(template, system)
  fmt = templates.get_template(name, generator.tokenizer, system)
  out = [dict(row, conversations=[dict(t) for t in row["conversations"]]) for row in rows]
  todo = [(r, s) for r, row in enumerate(out) for s in _slots(row)]
  # Turn by turn: a later reply is conditioned on the earlier ones, already replaced.
  by_depth: dict[int, list[tuple[int, int]]] = {}
  for r, s in todo:
    by_depth.setdefault(sum(1 for s2 in _slots(out[r]) if s2 < s), []).append((r, s))
  bar = tqdm(total=len(todo), desc="respond", unit="reply", disable=not progress)
  for depth in sorted(by_depth):
    work = by_depth[depth]
    for start in range(0, len(work), batch_size):
      chunk = work[start:start + batch_size]
      prompts = []
      for r, s in chunk:
        messages = [{"role": _role(t), "content": str(t["value"])} for t in out[r]["conversations"][:s]]
        messages.append({"role": "assistant", "content": ""})
        prompts.append(fmt.encode(messages)[0].tolist())
      results = generator.generate(prompts, max_new_tokens=max_new_tokens)
      for (r, s), res in zip(chunk, results):
        turns = out[r]["conversations"]
        reply = {"from": "gpt", "value": res.text.strip()}
        if s == len(turns):
          turns.append(reply)
        else:
          turns[s] = dict(turns[s], **reply)
      bar.update(len(chunk))
  bar.close()
  return out


def write_jsonl(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Written whole (local: a temporary file renamed into place; gs://: one upload)."""
  paths.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def respond_file(generator, src: str, out: str, **kw) -> str:
  rows = read_conversations(src)
  t0 = time.perf_counter()
  done = respond(generator, rows, **kw)
  write_jsonl(done, out)
  replies = sum(len(_slots(r)) for r in rows)
  return f"wrote {out}: {len(done)} conversations, {replies} replies in {time.perf_counter() - t0:.1f} s"
