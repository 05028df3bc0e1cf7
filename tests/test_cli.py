"""The `llasm-jax forward` command, in-process on one device and as a subprocess on 8 simulated CPU devices."""

import os
import pathlib
import subprocess
import sys

import pytest

from llasm_jax import cli
from llasm_jax.config import llasm_config, load_config_file

REPO = pathlib.Path(__file__).resolve().parent.parent


def expected_logits(config: str, batch: int, seconds: float, text_tokens: int) -> str:
  cfg = llasm_config(load_config_file(REPO / config).model)
  frames = cfg.audio.max_mel_frames if cfg.mode == "llasm" else int(seconds * 100)
  t = 2 * text_tokens + cfg.audio_tokens(frames) + 2
  return f"logits: float32[{batch}, {t}, {cfg.llm.vocab_size}]"


@pytest.mark.parametrize("config", ["configs/tiny.py", "configs/tiny_encoder.py"])
def test_forward(config, capsys):
  cli.main(["forward", "--config", str(REPO / config), "--seconds", "1.5", "--batch", "2",
            "--text-tokens", "3", "--repeats", "1"])
  out = capsys.readouterr().out
  assert expected_logits(config, 2, 1.5, 3) in out, out
  assert "finite: True" in out and "compile:" in out and "forward:" in out


def test_forward_on_8_simulated_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "llasm_jax.cli", "forward", "--config", "configs/tiny_encoder.py",
         "--seconds", "1", "--batch", "4", "--text-tokens", "2", "--repeats", "1",
         "--mesh", "data=2,fsdp=2,tensor=2"]
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in res.stdout
  assert expected_logits("configs/tiny_encoder.py", 4, 1, 2) in res.stdout, res.stdout



def test_user_errors_are_one_line_and_other_errors_keep_their_traceback(monkeypatch, capsys):
  from llasm_jax import cli
  from llasm_jax.errors import UserError

  def bad_input(args):
    raise UserError("--config 'x.py': not found; pass a file from configs/")

  def internal(args):
    raise ValueError("an internal shape mismatch")  # e.g. from inside JAX: not the user's to fix

  monkeypatch.setattr(cli, "train", bad_input)
  assert cli.main(["train", "--config", "x.py"]) == 2
  assert capsys.readouterr().err == "llasm-jax train: error: --config 'x.py': not found; pass a file from configs/\n"
  monkeypatch.setattr(cli, "train", internal)
  with pytest.raises(ValueError, match="internal shape mismatch"):
    cli.main(["train", "--config", "x.py"])
