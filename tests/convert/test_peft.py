"""`export` of a LoRA model: a PEFT adapter that `peft` loads onto the exported base, or merged weights."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

from llasm_jax import checkpoint
from llasm_jax.convert.export import export
from llasm_jax.errors import UserError
from llasm_jax.layers import LoraConfig, is_lora_path

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
IDS = np.random.default_rng(0).integers(3, 300, (2, 10))


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
  """A converted tiny LLaSM folder with LoRA factors drawn at random (B too, so that they matter),
  written as training writes its model folder; returns (root, base folder, LoRA folder)."""
  from tests.infer.conftest import make_checkpoints

  root = tmp_path_factory.mktemp("peft")
  base = make_checkpoints(root, mode="encoder")["llasm"]
  cfg = checkpoint.config_from_dict("llasm", checkpoint.read_meta(base)["config"])
  cfg = cfg.replace(llm=cfg.llm.replace(lora=LORA))
  model, _ = checkpoint.load_model(base, cfg=cfg)
  rng = np.random.default_rng(1)
  flat = {k: rng.normal(0, 0.2, v.shape).astype(np.float32) if is_lora_path(k) else np.asarray(v)
          for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep="/").items()}
  folder = str(root / "lora_model")
  with checkpoint.atomic_dir(folder) as tmp:
    checkpoint.save_params(tmp, "llasm", cfg, flat, stored_dtype="float32")
    checkpoint.copy_companions(base, tmp)
  return root, base, folder


def our_logits(folder):
  model, _ = checkpoint.load_model(folder)
  llm = model.llm if hasattr(model, "llm") else model
  return np.asarray(llm(jnp.asarray(IDS))[0])


def hf_logits(model):
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.float().numpy()


def test_peft_adapter_on_the_exported_base_equals_our_lora_model(lora_folder):
  import peft
  import transformers as tf

  root, base, folder = lora_folder
  out = root / "hf"
  written = export(folder, str(out), progress=False)
  assert set(written) == {"llm", "whisper", "llasm", "lora"}
  config = json.loads((out / "lora" / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, list(LORA.targets))
  ours = our_logits(folder)
  hf_base = tf.LlamaForCausalLM.from_pretrained(out / "llm", dtype=torch.float32)
  # llm/ holds the base weights, unchanged: without the adapter it is the converted model.
  np.testing.assert_allclose(hf_logits(hf_base), our_logits(base), atol=1e-4)
  adapted = peft.PeftModel.from_pretrained(hf_base, out / "lora").eval()
  np.testing.assert_allclose(hf_logits(adapted), ours, atol=1e-4)
  assert np.abs(ours - our_logits(base)).max() > 1e-2  # the factors matter


def test_merged_export_equals_our_lora_model(lora_folder):
  import transformers as tf

  from llasm_jax.convert.convert import convert

  root, _, folder = lora_folder
  out = root / "merged"
  written = export(folder, str(out), progress=False, lora="merge")
  assert "lora" not in written and not (out / "lora").exists()
  ours = our_logits(folder)
  merged = tf.LlamaForCausalLM.from_pretrained(out / "llm", dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_logits(merged), ours, atol=1e-4)
  # llasm/ (the released layout) always holds the merged weights: converted back, it is our model.
  back = str(root / "back")
  convert(str(out / "llasm"), str(out / "whisper"), out=back, mode="encoder", progress=False)
  np.testing.assert_allclose(our_logits(back), ours, atol=1e-4)


def test_cli_export_lora_flags():
  from llasm_jax.cli import build_parser

  parse = lambda *extra: build_parser().parse_args(["export", "--ckpt", "in", "--out", "out", *extra]).lora
  assert parse() == "peft" and parse("--lora", "peft") == "peft"
  assert parse("--merge-lora") == "merge" and parse("--lora", "merge") == "merge"
  with pytest.raises(UserError, match="lora="):
    export("unused", "unused", lora="gguf")
