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
