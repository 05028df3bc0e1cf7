"""Training on cached Whisper features (`data encode`) equals training on the audio, in both modes."""

import os

import numpy as np
import pytest

from llasm_jax import checkpoint
from llasm_jax.convert.convert import convert
from llasm_jax.data import builders, encode
from llasm_jax.errors import UserError
from tests.conftest import assert_close
from tests.infer.conftest import save_hf_pair
from tests.train.test_train import tiny_config

WINDOW = 300  # 3 s windows: the 2.9-4.5 s asset clips take two encoder-mode slots each


def llasm_folders(root, seed=0) -> dict[str, str]:
  """LLaSM model folders of one tiny HF LLM + Whisper pair, one per mode (folder name = mode)."""
  save_hf_pair(root, seed)
  out = {}
  for mode in ("llasm", "encoder"):
    out[mode] = str(root / mode)
    convert(str(root / "hf_llm"), str(root / "hf_whisper"), out=out[mode], mode=mode, progress=False)
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, assets):
  root = tmp_path_factory.mktemp("cached")
  raw = str(root / "asr")
  builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")), raw, quiet=True)
  ckpts = llasm_folders(root)
  caches = {}
  for mode, dtype in (("llasm", "float32"), ("encoder", "float32"), ("encoder", "bfloat16")):
    caches[mode, dtype] = str(root / f"cache_{mode}_{dtype}")
    encode.encode(ckpts[mode], raw, caches[mode, dtype], dtype=dtype, batch_size=4, mel_frames=WINDOW, quiet=True)
  return dict(root=root, raw=raw, ckpts=ckpts, caches=caches)


def stage1(ckpt, data, **data_kw):
  config = tiny_config(stage=1, steps=3)
  config.train.init_from = ckpt  # the model and its tokenizer
  config.train.batch_size = 2
  # Two audio slots: each clip is two 3 s windows in encoder mode; the doubled system prompt of
  # the llasm-cllama2 template takes ~300 tokens of this tokenizer.
  config.data.update(dict(source="tfds", dir=data, seq_len=448, max_audios=2, mel_frames=WINDOW, workers=-1,
                          **data_kw))
  return config


def run(setup, name, ckpt, data, **data_kw):
  from llasm_jax.train.trainer import train

  workdir = str(setup["root"] / name)
  summary = train(stage1(ckpt, data, **data_kw), workdir)
  assert summary["stop_reason"] == "finished" and summary["step"] == 3
  return [h["loss"] for h in summary["history"]], checkpoint.load_params_numpy(os.path.join(workdir, "model"))


@pytest.mark.parametrize("mode", ["encoder", "llasm"])
def test_cached_features_train_like_the_audio(setup, mode):
  """Same batches, same losses (float32 cache: within 1e-5) and the same trained adaptor."""
  ckpt = setup["ckpts"][mode]
  losses, params = run(setup, f"audio_{mode}", ckpt, setup["raw"])
  cached_losses, cached_params = run(setup, f"cached_{mode}", ckpt, setup["caches"][mode, "float32"])
  assert all(np.isfinite(losses)) and len(set(losses)) == 3, losses  # three different batches, all with targets
  assert_close(cached_losses, losses, atol=1e-5)
  start = checkpoint.load_params_numpy(ckpt)
  for path, value in params.items():
    if path.startswith("adaptor/"):
      assert np.abs(value - start[path]).max() > 1e-4, path  # it trained
      assert_close(cached_params[path], value, atol=1e-6)
    else:
      np.testing.assert_array_equal(cached_params[path], value, err_msg=path)
  if mode == "encoder":  # bfloat16 features: the same run within bfloat16 rounding
    bf16_losses, bf16_params = run(setup, "cached_bf16", ckpt, setup["caches"][mode, "bfloat16"])
    assert_close(bf16_losses, losses, atol=3e-2)  # losses ~6: 5e-3 relative
    for path in params:
      if path.startswith("adaptor/"):
        np.testing.assert_allclose(bf16_params[path], params[path], atol=2e-3, rtol=0, err_msg=path)


def test_a_cache_of_another_mode_or_whisper_is_refused(setup):
  from llasm_jax.train.trainer import train

  work = str(setup["root"] / "refused")
  with pytest.raises(UserError, match="features cached in 'encoder' mode, but the model runs in 'llasm' mode"):
    train(stage1(setup["ckpts"]["llasm"], setup["caches"]["encoder", "float32"]), work)
  with pytest.raises(UserError, match="cached in 300-frame windows but config.data.mel_frames is 600"):
    config = stage1(setup["ckpts"]["encoder"], setup["caches"]["encoder", "float32"])
    config.data.mel_frames = 600
    train(config, work)
  # Same sizes, other weights: the tiny_encoder preset's own random Whisper.
  config = stage1("", setup["caches"]["encoder", "float32"], tokenizer=setup["ckpts"]["encoder"])
  config.model = {"preset": "tiny_encoder"}
  with pytest.raises(UserError, match="features cached by another Whisper"):
    train(config, work)
  assert not os.path.exists(os.path.join(work, "model"))
