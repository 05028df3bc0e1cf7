"""Shared test fixtures: tiny random Hugging Face models saved with `save_pretrained`."""

import glob
import logging
import os
import socket
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


@pytest.fixture(scope="session")
def gcs():
  """Cloud Storage on 127.0.0.1: `gcp-storage-emulator` in memory, with the bucket GCS_BUCKET.
  gcsfs / etils.epath (STORAGE_EMULATOR_HOST) and Orbax's tensorstore (TENSORSTORE_GCS_HTTP_URL)
  talk to it, in this process and in the subprocesses it starts. Yields a function that returns
  a fresh gs:// folder per call."""
  from gcp_storage_emulator.server import create_server

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
  server.start()
  # Clients close connections early (HEAD probes): the emulator's tracebacks for that are noise.
  server._api._httpd.handle_error = lambda request, address: None
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  url = f"http://127.0.0.1:{port}"
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
  try:
    yield lambda name="run": f"gs://{GCS_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()


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
