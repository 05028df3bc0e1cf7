"""Shared test fixtures: tiny random Hugging Face models saved with `save_pretrained`."""

import glob
import os

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
