"""`llasm-jax serve` as a user starts it (int8 weights): a process on 127.0.0.1 that answers, then stops on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_serve_command_answers_and_stops(ckpts):
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-m", "llasm_jax.cli", "serve", "--ckpt", ckpts["llama"], "--port", str(port),
                           "--slots", "2", "--max-len", "128", "--model-name", "tiny", "--log-level", "warning",
                           "--quantize", "int8"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  try:
    deadline = time.monotonic() + 180
    while True:
      assert proc.poll() is None, proc.stdout.read()
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
          assert r.status == 200
          break
      except OSError:
        assert time.monotonic() < deadline, "the server did not start in 180 s"
        time.sleep(0.5)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello world"}],
                                       max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
  finally:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
  # uvicorn shuts down gracefully, then re-raises the signal it caught (so a supervisor sees it).
  assert proc.returncode in (0, -signal.SIGTERM), out
  assert f"OpenAI API at http://127.0.0.1:{port}/v1" in out
