"""`llasm-jax generate` and `llasm-jax chat`, in-process, on the tiny checkpoints of conftest.py."""

import io
import json

import pytest

from llasm_jax import cli
from llasm_jax.infer.generator import Generator


def run(capsys, *argv):
  code = cli.main(list(argv))
  out = capsys.readouterr()
  return code, out.out, out.err


def test_generate_json_equals_the_python_api(ckpts, gen, capsys):
  code, out, err = run(capsys, "generate", "--ckpt", ckpts["llasm"], "--audio", ckpts["wav"], "--audio", ckpts["wav2"],
                       "--prompt", "compare them", "--max-new-tokens", "5", "--json")
  assert code == 0, err
  res = json.loads(out)
  assert {"text", "token_ids", "prompt_token_ids", "finish_reason", "timings"} <= set(res)
  assert {"prefill_s", "decode_s", "decode_tokens_per_s"} <= set(res["timings"])
  [ref] = gen.generate(["compare them"], [[ckpts["wav"], ckpts["wav2"]]], max_new_tokens=5)
  assert res["token_ids"] == ref.token_ids and res["prompt_token_ids"] == ref.prompt_token_ids
  assert res["text"] == ref.text


def test_generate_prints_the_reply(ckpts, capsys):
  code, out, err = run(capsys, "generate", "--ckpt", ckpts["llama"], "--prompt", "hello world", "--max-new-tokens", "4",
                       "--temperature", "0.7", "--top-k", "20", "--seed", "1")
  assert code == 0, err
  [ref] = Generator.load(ckpts["llama"]).generate(["hello world"], max_new_tokens=4, temperature=0.7, top_k=20, seed=1)
  assert out == ref.text + "\n"


@pytest.mark.parametrize("args, message", [
    (["--audio", "MISSING.wav"], "audio 'MISSING.wav': file not found"),
    (["--audio", "BAD"], "cannot decode"),
    ([], "nothing to reply to"),
])
def test_generate_input_errors(ckpts, capsys, tmp_path, args, message):
  bad = tmp_path / "bad.ogg"
  bad.write_bytes(b"\x00garbage" * 64)
  args = [str(bad) if a == "BAD" else a for a in args]
  code, out, err = run(capsys, "generate", "--ckpt", ckpts["llasm"], *args)
  assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("which, message", [
    ("whisper", "holds Whisper alone"), ("empty", "not a llasm_jax checkpoint"), ("missing", "no such folder")])
def test_wrong_checkpoints_are_clear_errors(ckpts, capsys, tmp_path, which, message):
  folder = {"whisper": ckpts["whisper"], "empty": str(tmp_path), "missing": str(tmp_path / "nope")}[which]
  code, _, err = run(capsys, "generate", "--ckpt", folder, "--prompt", "hi")
  assert code == 2 and message in err, err


def test_chat_turns_with_audio_and_text(ckpts, gen, capsys, monkeypatch):
  lines = [ckpts["wav"], "what is said in this audio?", "/nonexistent/file.wav", f"{ckpts['wav2']} and this one?",
           "/quit", "never read"]
  monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
  code, out, err = run(capsys, "chat", "--ckpt", ckpts["llasm"], "--max-new-tokens", "3")
  assert code == 0, err
  assert "audio '/nonexistent/file.wav': file not found" in err
  replies = out.split("\n")[:-1]
  assert len(replies) == 3  # three good turns; the bad file was reported and skipped
  # The same conversation through the API gives the same replies.
  from llasm_jax.infer.generator import Chat

  chat = Chat(gen)
  expected = [chat.send(audio=ckpts["wav"], max_new_tokens=3).text,
              chat.send("what is said in this audio?", max_new_tokens=3).text,
              chat.send("and this one?", ckpts["wav2"], max_new_tokens=3).text]
  assert replies == expected
