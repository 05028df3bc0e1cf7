"""A server on 127.0.0.1 in a background thread, for tests, benchmarks and notebooks:

    with BackgroundServer(create_app(scheduler, model_name="m")) as url:   # http://127.0.0.1:PORT
      openai.OpenAI(base_url=url + "/v1", api_key="none").models.list()

It picks a free port, returns once uvicorn accepts connections, and stops (the app's lifespan
included: the scheduler thread ends) when the block ends.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class BackgroundServer:

  def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 120.0):
    self.app, self.host, self.port, self.start_timeout_s = app, host, port, start_timeout_s
    self._server: uvicorn.Server | None = None
    self._thread: threading.Thread | None = None

  def __enter__(self) -> str:
    if not self.port:
      with socket.socket() as s:
        s.bind((self.host, 0))
        self.port = s.getsockname()[1]
    config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="on")
    self._server = uvicorn.Server(config)
    self._thread = threading.Thread(target=self._server.run, name="llasm-jax-server", daemon=True)
    self._thread.start()
    deadline = time.monotonic() + self.start_timeout_s
    while not self._server.started:
      if not self._thread.is_alive():
        raise RuntimeError(f"the server on {self.host}:{self.port} stopped while starting (see its log)")
      if time.monotonic() > deadline:
        raise TimeoutError(f"the server on {self.host}:{self.port} did not start in {self.start_timeout_s:.0f} s")
      time.sleep(0.02)
    return f"http://{self.host}:{self.port}"

  def __exit__(self, *exc) -> None:
    self._server.should_exit = True
    self._thread.join(timeout=60)
