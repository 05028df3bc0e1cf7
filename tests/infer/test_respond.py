"""`data respond` writes exactly what `generate` answers, turn by turn, batched."""

import json

import pytest

from llasm_jax import cli
from llasm_jax.errors import UserError
from llasm_jax.infer.generator import Generator
from llasm_jax.infer.respond import read_conversations, respond


@pytest.fixture(scope="module")
def llm(ckpts):
  return Generator.load(ckpts["llama"], template="llasm-cllama2")


ROWS = [
    {"id": "a", "conversations": [{"from": "human", "value": "hello world"}], "source": "kept"},
    {"id": "b", "conversations": [{"from": "human", "value": "what is said in this audio?"},
                                  {"from": "gpt", "value": "an old answer"},
                                  {"from": "human", "value": "please transcribe the speech"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "the quick brown fox"}]},
]


def test_respond_equals_generate_turn_by_turn(llm):
  got = respond(llm, ROWS, max_new_tokens=6, batch_size=2, progress=False)
  assert got[0]["source"] == "kept" and ROWS[1]["conversations"][1]["value"] == "an old answer"
  for row, out in zip(ROWS, got):
    messages = []
    for turn in row["conversations"]:
      if turn["from"] == "gpt":
        continue
      messages.append({"role": "user", "content": turn["value"]})
      [res] = llm.generate([messages], max_new_tokens=6)
      messages.append({"role": "assistant", "content": res.text.strip()})
    assert [t["value"] for t in out["conversations"]] == [m["content"] for m in messages]
    assert [t["from"] for t in out["conversations"]] == ["human", "gpt"] * (len(messages) // 2)


def test_cli_reads_a_question_list_and_rejects_spoken_rows(ckpts, tmp_path, capsys):
  src = tmp_path / "questions.txt"
  src.write_text("hello world\n\nthe quick brown fox\n")
  out = tmp_path / "answers.jsonl"
  assert cli.main(["data", "respond", "--ckpt", ckpts["llama"], "--input", str(src), "--out", str(out),
                   "--template", "llasm-cllama2", "--max-new-tokens", "4"]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["conversations"][0]["value"] for r in rows] == ["hello world", "the quick brown fox"]
  assert all(r["conversations"][1]["from"] == "gpt" for r in rows)
  spoken = tmp_path / "spoken.jsonl"
  spoken.write_text(json.dumps({"id": "x", "conversations": [{"from": "human", "value": "<audio>"}]}) + "\n")
  with pytest.raises(UserError, match="before `data synth`"):
    read_conversations(str(spoken))
