"""Training: sharded runs equal the 1-device run, stages freeze what they say, exact resume, multi-host."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llasm_jax import checkpoint
from llasm_jax.config import load_config_file
from llasm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(stage=2, steps=3, **train):
  """Tiny encoder-mode model (short audio keeps CPU steps fast), float32, loss every step."""
  config = load_config_file(os.path.join(ROOT, "configs", "tiny.py") + f":stage{stage}")
  config.model = {"preset": "tiny_encoder"}
  config.data.mel_frames = 160
  config.data.seq_len = 40
  config.train.steps = steps
  config.train.log_every = 1
  config.train.checkpoint_every = 1000
  config.update({"train": {**config.train.to_dict(), **train}})
  return config


RUN = textwrap.dedent("""
    import json, os, sys
    import jax
    if os.environ.get("GLOO"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize("127.0.0.1:" + os.environ["PORT"], num_processes=2,
                                   process_id=int(os.environ["PROC"]))
    sys.path.insert(0, os.environ["ROOT"])
    from tests.train.test_train import tiny_config
    from llasm_jax.train.trainer import train
    config = tiny_config()
    out = {}
    for mesh in json.loads(os.environ["MESHES"]):
        config.mesh.shape = mesh
        summary = train(config, os.path.join(os.environ["WORK"], "_".join(map(str, mesh.values()))))
        out[str(mesh)] = [h["loss"] for h in summary["history"]]
    if jax.process_index() == 0:
        print("LOSSES " + json.dumps(out))
""")


def run_training(tmp_path, meshes, devices=1, procs=1):
  script = tmp_path / "run.py"
  script.write_text(RUN)
  port = _free_port()
  env = dict(os.environ, ROOT=ROOT, WORK=str(tmp_path / f"w{devices}x{procs}"), MESHES=json.dumps(meshes),
             JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PORT=str(port))
  if procs > 1:
    env["GLOO"] = "1"
  runs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, PROC=str(i)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(procs)]
  outs = [r.communicate(timeout=600) for r in runs]
  for r, (out, err) in zip(runs, outs):
    assert r.returncode == 0, err[-4000:]
  line = next(l for l in outs[0][0].splitlines() if l.startswith("LOSSES "))
  return json.loads(line[len("LOSSES "):])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  return run_training(tmp_path_factory.mktemp("one"), [mesh])[str(mesh)]


def test_sharded_losses_equal_single_device(single_device_losses, tmp_path):
  meshes = [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1},
            {"data": 2, "fsdp": 2, "tensor": 2}]
  losses = run_training(tmp_path, meshes, devices=8)
  assert len(single_device_losses) == 3
  for mesh in meshes:
    np.testing.assert_allclose(losses[str(mesh)], single_device_losses, rtol=1e-5, atol=0, err_msg=str(mesh))


def test_two_processes_match_single_process(single_device_losses, tmp_path):
  mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  losses = run_training(tmp_path, [mesh], devices=2, procs=2)
  np.testing.assert_allclose(losses[str(mesh)], single_device_losses, rtol=1e-5, atol=0)


def test_stage1_trains_only_the_adaptor(tmp_path):
  from flax import nnx
  from llasm_jax.models.llasm import LLASM_PRESETS, Llasm
  from llasm_jax.train.trainer import train

  config = tiny_config(stage=1, steps=2)
  config.train.checkpoint_every = 2
  train(config, str(tmp_path))
  after = checkpoint.load_params_numpy(str(tmp_path / "model"))
  from flax import traverse_util

  # The trainer's initial values: random init under jit (eager init differs in the last bits).
  init = jax.jit(lambda: nnx.state(Llasm(LLASM_PRESETS["tiny_encoder"], rngs=nnx.Rngs(config.train.seed))))()
  before = traverse_util.flatten_dict(nnx.to_pure_dict(init), sep="/")
  assert sorted(before) == sorted(after)
  for path in before:
    if path.startswith("adaptor/"):
      assert not np.array_equal(before[path], after[path]), path
    else:
      np.testing.assert_array_equal(np.asarray(before[path]), after[path], err_msg=path)
  # Optimizer state: Adam moments for the adaptor only (plus a few scalar counters).
  opt = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "2" / "opt_state"))
  adaptor_bytes = sum(a.nbytes for p, a in after.items() if p.startswith("adaptor/"))
  big = sum(np.asarray(a).nbytes for a in opt if np.ndim(a) > 0)
  assert big == 2 * adaptor_bytes, (big, adaptor_bytes)
  assert sum(np.asarray(a).nbytes for a in opt) < 2 * adaptor_bytes + 256


def _final_params(workdir):
  return checkpoint.load_params_numpy(os.path.join(workdir, "model"))


def test_resume_is_exact_including_after_sigterm(tmp_path):
  from llasm_jax.train.trainer import train

  straight = train(tiny_config(steps=6), str(tmp_path / "straight"))
  assert straight["stop_reason"] == "finished"

  first = train(tiny_config(steps=3), str(tmp_path / "resumed"))
  assert first["step"] == 3
  resumed = train(tiny_config(steps=6), str(tmp_path / "resumed"))
  assert resumed["step"] == 6

  preempted = train(tiny_config(steps=6, debug_sigterm_at_step=2), str(tmp_path / "sigterm"))
  assert preempted["stop_reason"].startswith("preempted") and preempted["step"] == 2
  assert not os.path.exists(tmp_path / "sigterm" / "model")
  after = train(tiny_config(steps=6), str(tmp_path / "sigterm"))
  assert after["step"] == 6

  ref = _final_params(tmp_path / "straight")
  for name in ("resumed", "sigterm"):
    got = _final_params(tmp_path / name)
    for path in ref:
      np.testing.assert_array_equal(got[path], ref[path], err_msg=f"{name}: {path}")
  # Same batches, same losses: the resumed halves reproduce the uninterrupted curve.
  losses = [h["loss"] for h in straight["history"]]
  assert [h["loss"] for h in first["history"] + resumed["history"]] == losses
  assert [h["loss"] for h in preempted["history"] + after["history"]] == losses


def test_nonfinite_steps_are_skipped_and_stop_the_run(tmp_path):
  from llasm_jax.train.trainer import train

  config = tiny_config(stage=1, steps=5, max_nonfinite_steps=2)
  config.optim.lr = float("inf")
  summary = train(config, str(tmp_path))
  assert summary["stop_reason"].startswith("stopped: 3 steps had non-finite")


def test_grad_accumulation_and_remat_give_the_same_step(tmp_path):
  from llasm_jax.train.trainer import train

  base = train(tiny_config(steps=2), str(tmp_path / "base"))
  accum = train(tiny_config(steps=2, grad_accum=2), str(tmp_path / "accum"))
  config = tiny_config(steps=2)
  config.model = {"preset": "tiny_encoder", "llm": {"remat_policy": "full"}, "audio": {"remat_policy": "dots"}}
  remat = train(config, str(tmp_path / "remat"))
  losses = [h["loss"] for h in base["history"]]
  np.testing.assert_allclose([h["loss"] for h in accum["history"]], losses, rtol=1e-5)
  np.testing.assert_allclose([h["loss"] for h in remat["history"]], losses, rtol=1e-6)
  ref, got = _final_params(tmp_path / "base"), _final_params(tmp_path / "accum")
  for path in ref:
    np.testing.assert_allclose(got[path], ref[path], atol=1e-6, err_msg=path)


def test_stage2_starts_from_the_stage1_model(tmp_path):
  from llasm_jax.train.trainer import train

  train(tiny_config(stage=1, steps=2), str(tmp_path / "stage1"))
  stage1 = _final_params(tmp_path / "stage1")
  config = tiny_config(stage=2, steps=1)
  config.optim.lr = 0.0  # one step that changes nothing: the start point is visible in the output
  config.train.init_from = str(tmp_path / "stage1" / "model")
  train(config, str(tmp_path / "stage2"))
  stage2 = _final_params(tmp_path / "stage2")
  for path in stage1:
    np.testing.assert_array_equal(stage2[path], stage1[path], err_msg=path)


def test_stage1_on_a_built_asr_dataset(tmp_path, assets):
  """End to end: HF folders -> convert -> `data build asr` on the shared assets -> train."""
  from llasm_jax.data import builders
  from llasm_jax.train.trainer import train
  from tests.infer.conftest import make_checkpoints

  ckpt = make_checkpoints(tmp_path, mode="encoder")["llasm"]
  builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")), str(tmp_path / "asr"),
                 quiet=True)
  config = tiny_config(stage=1, steps=2)
  config.model = {"preset": "tiny_encoder"}  # the architecture comes from init_from
  config.train.init_from = ckpt
  config.train.batch_size = 2
  config.data.update(dict(source="tfds", dir=str(tmp_path / "asr"), seq_len=640, mel_frames=1000, workers=1))
  summary = train(config, str(tmp_path / "work"))
  assert summary["stop_reason"] == "finished" and summary["step"] == 2
  assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in summary["history"])
  # It started from the converted model and trained the adaptor alone: every other weight is the converted one.
  before, after = checkpoint.load_params_numpy(ckpt), _final_params(tmp_path / "work")
  assert sorted(before) == sorted(after)
  for path in before:
    if path.startswith("adaptor/"):
      assert not np.array_equal(before[path], after[path]), path
    else:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_compile_only_reports_memory_without_allocating():
  from flax import nnx
  from llasm_jax.models.llasm import LLASM_PRESETS, Llasm
  from llasm_jax.train.trainer import compile_only

  abstract = nnx.state(nnx.eval_shape(lambda: Llasm(LLASM_PRESETS["tiny_encoder"], rngs=nnx.Rngs(0))), nnx.Param)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  live = sum(a.nbytes for a in jax.live_arrays())
  out = compile_only(tiny_config())
  memory = out["memory_bytes"]
  # The step takes the whole train state as arguments (parameters and Adam moments) and works in
  # temporaries; exact bytes, since the GiB fields of a tiny model round to 0.
  assert memory["argument_size_in_bytes"] >= param_bytes and memory["temp_size_in_bytes"] > 0, memory
  assert out["model_flops_per_step"] > 0
  assert sum(a.nbytes for a in jax.live_arrays()) - live < param_bytes  # no state of the model was left allocated


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
  from llasm_jax.train.trainer import train

  config = tiny_config(stage=2, steps=2)
  config.model = {"preset": "tiny_encoder", "llm": {"dtype": "bfloat16"}, "audio": {"dtype": "bfloat16"}}
  bf16 = train(config, str(tmp_path / "bf16"))
  f32 = train(tiny_config(stage=2, steps=2), str(tmp_path / "f32"))
  params = _final_params(tmp_path / "bf16")
  assert all(a.dtype == np.float32 for a in params.values())
  np.testing.assert_allclose([h["loss"] for h in bf16["history"]], [h["loss"] for h in f32["history"]], rtol=2e-2)


PREEMPTED = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize("127.0.0.1:" + os.environ["PORT"], num_processes=2, process_id=int(os.environ["PROC"]))
    sys.path.insert(0, os.environ["ROOT"])
    from tests.train.test_train import tiny_config
    from llasm_jax.train.trainer import train
    # First launch: only process 1 is preempted, between logging intervals (log_every 100). A
    # preempted process exits; the job is launched again, as a scheduler would.
    sigterm = 3 if os.environ["PROC"] == "1" and os.environ["LAUNCH"] == "first" else 0
    summary = train(tiny_config(steps=60, log_every=100, debug_sigterm_at_step=sigterm), os.environ["WORK"])
    print("RESULT " + json.dumps([summary["stop_reason"], summary["step"]]), flush=True)
""")


def _launch_pair(script, env, launch):
  runs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, PROC=str(i), LAUNCH=launch),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for r in runs:
    out, err = r.communicate(timeout=600)
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, err[-4000:]
    results.append(json.loads(lines[0][len("RESULT "):]))
  return results


# Slow, and not yet reliable here: on the loaded 2-core VM the coordination service declared the
# SIGTERMed process's heartbeat timed out in 4 of 7 runs (whenever the run got through, both hosts
# saved the same step and the next launch finished). Run it with `pytest -m slow` on a quiet host.
@pytest.mark.slow
def test_sigterm_on_one_host_saves_the_same_step_on_all(tmp_path):
  """JAX's preemption sync point: the other host learns of the signal without waiting for a
  logging interval, both save the same step, and the next launch finishes from it."""
  script = tmp_path / "run.py"
  script.write_text(PREEMPTED)
  env = dict(os.environ, ROOT=ROOT, WORK=str(tmp_path / "work"), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  first = _launch_pair(script, dict(env, PORT=str(_free_port())), "first")
  (reason, step), other = first
  assert reason.startswith("preempted") and 3 <= step < 60 and other == first[0], first
  again = _launch_pair(script, dict(env, PORT=str(_free_port())), "again")
  assert again == [["finished", 60]] * 2, again


def test_resuming_with_other_trainable_parameters_names_the_difference(tmp_path):
  from llasm_jax.train.trainer import train

  train(tiny_config(stage=2, steps=2), str(tmp_path))
  config = tiny_config(stage=2, steps=4)
  config.train.trainable = ("adaptor/.*",)
  with pytest.raises(UserError, match=r"trained \{'trainable': \['adaptor/\.\*', 'llm/\.\*'\].*this config trains "
                                       r"\{'trainable': \['adaptor/\.\*'\]"):
    train(config, str(tmp_path))
  assert train(tiny_config(stage=2, steps=4), str(tmp_path))["step"] == 4  # the same config resumes


def test_length_buckets_compile_one_step_per_bucket(tmp_path, capsys, assets):
  """Batches of different bucket lengths in one run: each length gets its own compiled step."""
  from llasm_jax.data import builders
  from llasm_jax.train.trainer import train
  from tests.infer.conftest import make_checkpoints

  ckpt = make_checkpoints(tmp_path, mode="encoder")["llasm"]
  builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")), str(tmp_path / "asr"),
                 quiet=True)
  config = tiny_config(stage=1, steps=4)
  config.train.init_from = ckpt
  config.train.batch_size = 2
  config.data.update(dict(source="tfds", dir=str(tmp_path / "asr"), seq_len=640, buckets=(400, 640),
                          mel_frames=1000, workers=-1))
  summary = train(config, str(tmp_path / "work"))
  assert summary["stop_reason"] == "finished" and summary["step"] == 4
  assert all(np.isfinite(h["loss"]) for h in summary["history"])
  assert "(shape 2:" in capsys.readouterr().out


def test_three_axis_mesh_compiles_without_involuntary_rematerialization():
  """The embedding lookups (LLM and Whisper decoder) under data x fsdp x tensor: XLA used to
  replicate their whole output before resharding it, and said so on stderr."""
  code = textwrap.dedent("""
      import os, sys
      sys.path.insert(0, os.environ["ROOT"])
      from tests.train.test_train import tiny_config
      from llasm_jax.train.trainer import compile_only
      config = tiny_config(stage=2)
      config.model = {"preset": "tiny"}  # "llasm" mode: the Whisper decoder embeds its queries too
      config.mesh.shape = {"data": 2, "fsdp": 2, "tensor": 2}
      compile_only(config, quiet=True)
  """)
  env = dict(os.environ, ROOT=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Involuntary full rematerialization" not in run.stderr, run.stderr[-3000:]
