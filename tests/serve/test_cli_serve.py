"""`llasm-jax serve` as a user starts it (int8 weights): a process on 127.0.0.1 that answers, then stops on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import threading

import openai


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_serve_command_answers_and_stops(ckpts):
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # At log level info uvicorn says "Uvicorn running on ..." once its socket listens: the line waited for.
  proc = subprocess.Popen([sys.executable, "-m", "llasm_jax.cli", "serve", "--ckpt", ckpts["llama"], "--port", str(port),
                           "--slots", "2", "--max-len", "128", "--model-name", "tiny", "--log-level", "info",
                           "--quantize", "int8"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  lines, ready = [], threading.Event()

  def read():  # all of its output, kept; `ready` once uvicorn listens, or the process ended
    for line in proc.stdout:
      lines.append(line)
      if f"Uvicorn running on http://127.0.0.1:{port}" in line:
        ready.set()
    ready.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    assert ready.wait(timeout=180), "the server did not start in 180 s"
    assert proc.poll() is None and "Uvicorn running on" in "".join(lines), "".join(lines)  # not ended instead
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello world"}],
                                       max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join(timeout=60)
  out = "".join(lines)
  # uvicorn shuts down gracefully, then re-raises the signal it caught (so a supervisor sees it).
  assert proc.returncode in (0, -signal.SIGTERM), out
  assert f"OpenAI API at http://127.0.0.1:{port}/v1" in out
