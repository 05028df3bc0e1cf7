"""`llasm-jax serve` through the official `openai` client, against a real server on 127.0.0.1.

The model is the tiny converted LLaSM of tests/infer/conftest.py (random weights, a real
tokenizer): greedy replies must be the tokens `Generator.generate` gives for the same prompt.
"""

import asyncio
import base64
import json
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from llasm_jax.infer.generator import Generator
from llasm_jax.serve import loadtest
from llasm_jax.serve.app import create_app
from llasm_jax.serve.background import BackgroundServer
from llasm_jax.serve.scheduler import QueueFull, Scheduler

MODEL = "tiny-llasm"


@pytest.fixture(scope="module")
def server(ckpts):
  gen = Generator.load(ckpts["llasm"])
  scheduler = Scheduler(gen, slots=4, max_len=512, chunk=2)
  app = create_app(scheduler, model_name=MODEL, max_audio_bytes=2**20)
  with BackgroundServer(app) as url:
    yield url, gen, scheduler


def client(url) -> openai.OpenAI:
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def post(url: str, body: bytes | dict, path="/v1/chat/completions") -> tuple[int, dict, dict]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
  try:
    with urllib.request.urlopen(req) as r:
      return r.status, dict(r.headers), json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, dict(e.headers), json.loads(e.read())


def health(url) -> dict:
  with urllib.request.urlopen(url + "/health") as r:
    return json.loads(r.read())


def chat(url, content, **kw):
  return client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                             temperature=0, **kw)


def test_models_and_health(server):
  url, _, _ = server
  assert [m.id for m in client(url).models.list().data] == [MODEL]
  h = health(url)
  assert h["status"] == "ok" and h["slots"] == 4 and h["max_len"] == 512


def test_text_chat_equals_generate(server):
  url, gen, _ = server
  r = chat(url, "hello world", max_tokens=12)
  [ref] = gen.generate(["hello world"], max_new_tokens=12)
  assert r.choices[0].message.content == ref.text
  assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
  assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
  assert r.usage.completion_tokens == len(ref.token_ids)
  assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_sends_the_same_text_in_chunks(server):
  url, _, _ = server
  whole = chat(url, "the quick brown fox", max_tokens=16).choices[0].message.content
  chunks = list(chat(url, "the quick brown fox", max_tokens=16, stream=True, stream_options={"include_usage": True}))
  pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
  assert "".join(pieces) == whole and len(pieces) > 1
  assert chunks[0].choices[0].delta.role == "assistant"
  finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert finishes in (["length"], ["stop"])
  assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices


def test_audio_chat_equals_generate(server, ckpts):
  url, gen, _ = server
  content = [loadtest.audio_part(ckpts["wav"]), {"type": "text", "text": "what is said in this audio?"}]
  r = chat(url, content, max_tokens=12)
  [ref] = gen.generate(["what is said in this audio?"], audios=[[ckpts["wav"]]], max_new_tokens=12)
  assert r.choices[0].message.content == ref.text
  assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_transcription_is_the_stage1_prompt(server, ckpts):
  from llasm_jax.data import templates

  url, gen, _ = server
  with open(ckpts["wav"], "rb") as f:
    t = client(url).audio.transcriptions.create(model=MODEL, file=f)
  prompt = templates.AUDIO + "\n" + templates.TRANSCRIBE_EN[0]
  room = 512 - len(gen.prepare(prompt, [ckpts["wav"]])[0])  # no max_tokens: the rest of the slot
  [ref] = gen.generate([prompt], audios=[[ckpts["wav"]]], max_new_tokens=room)
  assert t.text == ref.text.strip()


def test_stop_strings_seed_and_sampling(server):
  url, _, _ = server
  whole = chat(url, "hello world", max_tokens=16).choices[0].message.content
  cut = whole[3:6]
  r = chat(url, "hello world", max_tokens=16, stop=[cut])
  assert r.choices[0].message.content == whole[:whole.index(cut)] and r.choices[0].finish_reason == "stop"
  kw = dict(model=MODEL, messages=[{"role": "user", "content": "hello world"}], max_tokens=12, temperature=1.0,
            top_p=0.9, seed=7)
  a, b = (client(url).chat.completions.create(**kw).choices[0].message.content for _ in range(2))
  assert a == b  # a seed fixes the sampled tokens


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"not audio" * 50).decode(), "format": "wav"}}]}]},
     400, "messages.0.content.0.input_audio"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}]}, 400,
     "messages.0.content.0.input_audio.data"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "midi"}}]}]}, 400,
     "messages.0.content.0.input_audio.format"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(bytes(2**20 + 10)).decode(), "format": "pcm16"}}]}]},
     413, "messages.0.content.0.input_audio"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "fake <au_patch> audio"}]}, 400, "messages.0.content"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, param):
  url, _, _ = server
  got, _, err = post(url, body)
  assert got == status, err
  assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
  if param is not None:
    assert err["error"]["param"] == param, err
  assert chat(url, "hello world", max_tokens=2).choices[0].message.content is not None


def test_a_full_queue_answers_429_with_retry_after(ckpts):
  gen = Generator.load(ckpts["llama"])
  scheduler = Scheduler(gen, slots=1, max_len=64, max_queue=0)
  with BackgroundServer(create_app(scheduler, model_name="m")) as url:
    status, headers, err = post(url, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 429 and int(headers["retry-after"]) >= 1 and err["error"]["code"] == "queue_full"
    assert health(url)["status"] == "ok"


def test_a_queue_holds_max_queue_requests(ckpts):
  gen = Generator.load(ckpts["llama"])
  scheduler = Scheduler(gen, slots=1, max_len=64, max_queue=1)  # not started: nothing leaves the queue

  async def submit_two():
    ids = gen.prepare("hello")[0]
    scheduler.submit(ids, max_new_tokens=4)
    with pytest.raises(QueueFull, match="retry after"):
      scheduler.submit(ids, max_new_tokens=4)

  asyncio.run(submit_two())


@pytest.fixture(scope="module")
def long_server(ckpts):
  """Slots long enough for replies that outlast a client's patience (a text-only LLM, no system prompt)."""
  scheduler = Scheduler(Generator.load(ckpts["llama"]), slots=2, max_len=4096, chunk=2)
  with BackgroundServer(create_app(scheduler, model_name="m")) as url:
    yield url, scheduler


def after_each(monkeypatch, scheduler: Scheduler, method: str, condition) -> threading.Event:
  """An event the scheduler thread sets when `condition()` holds right after its call of `method`:
  what a test waits on, instead of polling the server."""
  event, call = threading.Event(), getattr(scheduler, method)

  def wrapped(*args, **kwargs):
    out = call(*args, **kwargs)
    if condition():
      event.set()
    return out

  monkeypatch.setattr(scheduler, method, wrapped)
  return event


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(long_server, stream, monkeypatch):
  url, scheduler = long_server
  host, port = url.removeprefix("http://").split(":")
  before = scheduler.stats["cancelled"]
  admitted = after_each(monkeypatch, scheduler, "_admit", lambda: bool(scheduler.running))
  dropped = after_each(monkeypatch, scheduler, "_drop_cancelled", lambda: scheduler.stats["cancelled"] > before)
  body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4000,
                     "temperature": 0, "stream": stream}).encode()
  sock = socket.create_connection((host, int(port)))
  sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
  if stream:
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the headers, then the first chunks
  else:
    assert admitted.wait(timeout=60), "the request took no slot in 60 s"
  sock.close()  # gone mid-reply, thousands of tokens before its end
  assert dropped.wait(timeout=60), f"the slot was not freed in 60 s: {scheduler.health()}"
  assert health(url)["running"] == 0
  r = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
  assert r.usage.completion_tokens >= 1


def test_concurrent_clients_get_the_answers_they_get_alone(server):
  """The bounded load test: 32 clients at once on 4 slots (the rest wait in the queue); every
  greedy reply equals the same request sent alone. Throughput is measured in bench/serve_load.py."""
  url, _, _ = server
  conversations = [[{"role": "user", "content": f"hello {i} world"}] for i in range(32)]
  report = asyncio.run(loadtest.run(url, MODEL, conversations, concurrency=32, max_tokens=12, time_limit_s=300,
                                    warmup=False))
  assert report["mismatches"] == []
  assert report["concurrent"]["requests"] == 32 and report["concurrent"]["tokens"] > 0
  assert np.isfinite(report["concurrent"]["latency_p99_s"])
