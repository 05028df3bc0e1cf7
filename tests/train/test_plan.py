"""`llasm-jax train --topology`: libtpu compiles the train step for a TPU slice on a CPU host."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from llasm_jax import cli
from llasm_jax.config import load_config_file
from llasm_jax.errors import UserError
from llasm_jax.train import plan
from tests.train.test_train import ROOT, tiny_config

pytest.importorskip("libtpu")

TOPOLOGY = "v5e:2x2"  # 4 chips, one host: compiles the tiny step in seconds
# The tests' tiny encoder-mode model (tests/train/test_train.py tiny_config) from the command line.
TINY = [os.path.join(ROOT, "configs", "tiny.py") + ":stage1", "--config.model.preset=tiny_encoder",
        "--config.data.mel_frames=160", "--config.data.seq_len=40"]


def quiet(_):
  pass


def test_tiny_step_compiled_for_a_tpu_slice_fits():
  r = plan.plan(tiny_config(stage=1), TOPOLOGY, log=quiet)
  assert (r["chip"], r["chips"], r["devices"], r["hosts"]) == ("v5e", 4, 4, 1)
  assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}  # data=-1 resolved over the slice's chips
  assert r["argument_size_gib"] > 0 and r["temp_size_gib"] >= 0 and r["peak_memory_gib"] > 0
  assert r["alias_size_gib"] > 0  # the donated train state: its outputs reuse the argument buffers
  assert r["hbm_gib_per_chip"] == 16 and r["usable_gib"] == plan.CHIPS["v5e"].usable_gib
  assert r["fits"] and 0 < r["margin_gib"] < r["usable_gib"] and 0 < r["margin_pct"] <= 100
  assert r["per_chip_batch"] * 4 == r["batch_size"]
  assert r["model_flops_per_chip"] * 4 == pytest.approx(r["model_flops_per_step"])
  assert r["step_s_at_mfu"] == pytest.approx(r["step_s_at_peak"] / plan.MFU)
  json.dumps(r)  # the result is JSON-able as it is


def test_cli_prints_the_plan_and_writes_json(tmp_path, capsys):
  out = tmp_path / "plan.json"
  rc = cli.main(["train", "--config", *TINY, "--compile-only", "--topology", TOPOLOGY, "--json", str(out)])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert "plan: tiny.py:stage1 on v5e:2x2 (4 chips v5e, 1 host; mesh data 4 x fsdp 1 x tensor 1)" in text
  assert "fits           yes:" in text and "at 40% MFU" in text
  saved = json.loads(out.read_text())
  assert saved["fits"] and saved["topology"] == TOPOLOGY and saved["batch_size"] == 8


def test_does_not_fit_exits_2_naming_the_fixes():
  """As `llasm-jax` runs from a shell: exit status 2, one line naming the fixes, libtpu quiet
  about the TPU host it does not find, and not blocked by another JAX process's libtpu lock."""
  env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
  holder = subprocess.Popen([sys.executable, "-c", "import sys, jax; jax.devices(); print(1, flush=True); "
                             "sys.stdin.read()"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
  try:
    assert holder.stdout.readline().strip() == "1"  # it holds /tmp/libtpu_lockfile now
    cmd = [sys.executable, "-m", "llasm_jax.cli", "train", "--config", *TINY, "--compile-only", "--topology",
           TOPOLOGY, "--config.train.batch_size=1024", "--config.data.seq_len=4096"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  finally:
    holder.communicate("", timeout=60)
  assert res.returncode == 2, res.stderr[-3000:]
  assert "fits           NO: needs" in res.stdout and "RESOURCE_EXHAUSTED" in res.stdout
  [line] = [x for x in res.stderr.splitlines() if "error:" in x]
  assert "does not fit v5e:2x2 at batch 1024 (256 per chip): lower --config.train.batch_size" in line
  assert "remat_policy=full" in line and "bigger slice" in line and "--search" in line
  assert "TPU_ACCELERATOR_TYPE" not in res.stderr and "TPU_WORKER_HOSTNAMES" not in res.stderr


@pytest.mark.parametrize("topology, chip, devices, hosts", [
    ("v4:2x2x2", "v4", 8, 2),  # megacore: one device per chip, as v4 jobs run
    ("v5p:2x2x4", "v5p", 16, 4),
    ("v6e:8x8", "v6e", 64, 16),
    ("tpu7x:2x2x1", "tpu7x", 8, 1),  # two devices per chip
])
def test_topology_devices(topology, chip, devices, hosts):
  got, c = plan.topology_devices(topology)
  assert (c.name, len(got), len({d.process_index for d in got})) == (chip, devices, hosts)


@pytest.mark.parametrize("topology, message", [
    ("v5e-4", r"--topology 'v5e-4' is not GENERATION:CHIPS; use e\.g\. v5e:2x2, .*v5p:4x4x4"),
    ("v9:2x2", r"--topology 'v9:2x2' names no chip of v4, v5e, v5p, v6e, tpu7x; use e\.g\. v5e:2x2"),
    ("v5e:3x3", r"--topology 'v5e:3x3': libtpu does not know it \(Topology layout .* is not divisible .*\); "
                r"use GENERATION:CHIPS such as v5e:2x2"),
])
def test_unknown_topology(topology, message):
  with pytest.raises(UserError, match=message):
    plan.plan(tiny_config(stage=1), topology, log=quiet)


def test_no_libtpu_names_the_package(monkeypatch):
  from jax.experimental import topologies

  def missing(**_):
    raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology. See https://github.com/...")

  monkeypatch.setattr(topologies, "get_topology_desc", missing)
  with pytest.raises(UserError, match=r"--topology needs libtpu, the TPU compiler: pip install 'jax\[tpu\]'"):
    plan.topology_devices(TOPOLOGY)


def test_mesh_that_does_not_match_the_slice():
  config = tiny_config(stage=1)
  config.mesh.shape = {"data": 2, "fsdp": 1, "tensor": 1}
  with pytest.raises(UserError, match=r"--topology v5e:2x2 \(4 devices\): config.mesh product 2 != 4 devices; "
                                       r"fix config.mesh.shape or set one axis to -1"):
    plan.plan(config, TOPOLOGY, log=quiet)


def test_batch_that_does_not_divide_over_data_x_fsdp():
  config = tiny_config(stage=1, batch_size=10, grad_accum=1)
  with pytest.raises(UserError, match=r"config.train.batch_size 10 does not divide over grad_accum 1 x data x fsdp "
                                       r"4 \(v5e:2x2\); use a multiple of 4, e\.g\. --config.train.batch_size=8 or 12"):
    plan.plan(config, TOPOLOGY, log=quiet)
  with pytest.raises(UserError, match=r"batch_size 8 does not divide over grad_accum 4 x data x fsdp 4 .*of 16, "
                                       r"e\.g\. --config.train.batch_size=16 \(or fewer data x fsdp: "
                                       r"--config.mesh.shape.tensor=2 halves them\)$"):
    plan.plan(tiny_config(stage=1, batch_size=8, grad_accum=4), TOPOLOGY, log=quiet)


def test_search_needs_a_topology_and_known_policies(capsys):
  assert cli.main(["train", "--config", *TINY, "--search"]) == 2
  assert "--search needs --topology" in capsys.readouterr().err
  with pytest.raises(UserError, match=r"--search 'fastest': remat policies are none, full, dots"):
    plan.search(tiny_config(stage=1), TOPOLOGY, policies=["fastest"], log=quiet)


def test_search_on_the_tiny_config(tmp_path, capsys):
  """Two policies, capped at the config's own per-chip batch: one compile each."""
  out = tmp_path / "search.json"
  rc = cli.main(["train", "--config", *TINY, "--topology", TOPOLOGY, "--search", "none,full", "--max-batch", "2",
                 "--json", str(out)])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert "largest per-chip batch that fits v5e:2x2" in text and "(+: the search stopped at --max-batch 2" in text
  r = json.loads(out.read_text())
  assert [row["policy"] for row in r["results"]] == ["none", "full"]
  for row in r["results"]:
    assert row["per_chip_batch"] == 2 and row["batch_size"] == 8 and 0 < row["need_gib"] < row["usable_gib"]
    assert row["model_flops_per_step"] > 0 and row["step_s_at_mfu"] > 0
  assert r["compiles"] == 2 and all(t["fits"] for t in r["tried"])


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 8, 13, 64, 100, 1000])
@pytest.mark.parametrize("start", [1, 4, 40])
def test_largest_fitting_doubles_then_bisects(limit, start):
  calls = []

  def fits(n):
    calls.append(n)
    return n <= limit

  cap = 100
  assert plan.largest_fitting(fits, cap, start=start) == min(limit, cap)
  assert len(calls) == len(set(calls))  # no batch compiled twice
  assert len(calls) <= 2 * (cap.bit_length() + 1)


@pytest.mark.slow
def test_7b_stage2_on_v5p_16_chips():
  """The real 7B stage-2 step (global batch 128 x 2048, FSDP over 16 chips, full remat)."""
  config = load_config_file(f"{pathlib.Path(ROOT) / 'configs' / 'llasm_cllama2_7b.py'}:stage2")
  r = plan.plan(config, "v5p:2x2x4", name="llasm_cllama2_7b.py:stage2")
  assert (r["chips"], r["hosts"], r["mesh"]["fsdp"], r["per_chip_batch"]) == (16, 4, 16, 8)
  # ~7B float32 master weights + Adam moments (adaptor and LLM train) over 16 chips: ~5 GiB each.
  assert 4 < r["argument_size_gib"] < 6.5
  assert r["fits"] and 10 < r["need_gib"] < 60
  assert 5e15 < r["model_flops_per_step"] < 2e16
