"""gs:// paths for real, without the cloud: convert, train (SIGTERM, resume), generate, export and
`data build` against a Cloud Storage emulator, each equal to the same work on local disk."""

import json
import os

import jax
import numpy as np
import pytest
from etils import epath

from llasm_jax import checkpoint, compilation_cache
from llasm_jax.errors import UserError
from tests.infer.conftest import make_checkpoints
from tests.train.test_train import tiny_config


def _files(folder) -> dict[str, bytes]:
  """Relative path -> bytes of every file under `folder` (local or gs://)."""
  root, out, todo = epath.Path(folder), {}, [epath.Path(folder)]
  while todo:  # epath's walk() drops the gs:// of the folders it yields
    for p in todo.pop().iterdir():
      if p.is_dir():
        todo.append(p)
      else:
        out[os.path.relpath(os.fspath(p), os.fspath(root))] = p.read_bytes()
  return out


def _params_equal(a: str, b: str) -> None:
  got, ref = checkpoint.load_params_numpy(a), checkpoint.load_params_numpy(b)
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_train_on_gcs_resumes_and_equals_local_disk(gcs, tmp_path):
  from llasm_jax.convert.convert import convert
  from llasm_jax.convert.export import export
  from llasm_jax.infer.generator import Generator
  from llasm_jax.train.trainer import train

  local_init = make_checkpoints(tmp_path, mode="encoder")["llasm"]
  bucket = gcs()
  init = f"{bucket}/init"
  convert(str(tmp_path / "hf_llm"), str(tmp_path / "hf_whisper"), out=init, mode="encoder", progress=False)
  _params_equal(init, local_init)
  assert _files(init)["tokenizer.json"] == _files(local_init)["tokenizer.json"]

  def config(init_from, **train_kw):
    c = tiny_config(stage=1, steps=4, **train_kw)
    c.train.init_from = init_from
    return c

  work = f"{bucket}/run"
  preempted = train(config(init, debug_sigterm_at_step=2), work)
  assert preempted["stop_reason"].startswith("preempted") and preempted["step"] == 2
  assert not epath.Path(work, "model").exists()
  resumed = train(config(init), work)
  assert resumed["stop_reason"] == "finished" and resumed["step"] == 4
  straight = train(config(local_init), str(tmp_path / "local"))

  _params_equal(f"{work}/model", str(tmp_path / "local" / "model"))
  assert ([h["loss"] for h in preempted["history"] + resumed["history"]]
          == [h["loss"] for h in straight["history"]])
  run = epath.Path(work)
  for name in ("config.json", "run.json", "metrics.jsonl", "model/llasm_jax.json", "model/tokenizer.json"):
    assert (run / name).exists(), name
  assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4

  # generate and export read the model folder straight from the bucket.
  [remote], [ref] = (Generator.load(f).generate(["hello world"], max_new_tokens=4)
                     for f in (f"{work}/model", str(tmp_path / "local" / "model")))
  assert remote.token_ids == ref.token_ids
  export(f"{work}/model", f"{bucket}/export", progress=False)
  export(str(tmp_path / "local" / "model"), str(tmp_path / "export"), progress=False)
  assert _files(f"{bucket}/export") == _files(tmp_path / "export")


def test_interrupted_bucket_folder_reads_as_incomplete(gcs, tmp_path):
  """No rename on an object store: a model folder counts once its llasm_jax.json is there."""
  from llasm_jax.convert.convert import convert

  make_checkpoints(tmp_path, mode="encoder")
  out = f"{gcs()}/model"

  seen = []

  def stop(name):
    seen.append(name)
    if len(seen) == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    convert(str(tmp_path / "hf_llm"), out=out, progress=False, _on_tensor=stop)
  with pytest.raises((UserError, FileNotFoundError)):
    checkpoint.read_meta(out)
  convert(str(tmp_path / "hf_llm"), out=out, progress=False, overwrite=True)
  assert checkpoint.read_meta(out)["kind"] == "llama"
  # A write stopped after the arrays, before the marker (what a preempted multi-host save leaves).
  epath.Path(out, checkpoint.META_FILE).unlink()
  with pytest.raises(UserError, match="did not finish"):
    checkpoint.read_meta(out)
  convert(str(tmp_path / "hf_llm"), out=out, progress=False, overwrite=True)
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert(str(tmp_path / "hf_llm"), out=out, progress=False)


def test_data_build_to_gcs_equals_local(gcs, tmp_path, assets):
  from llasm_jax import cli
  from llasm_jax.data import builders

  manifest = os.path.join(assets, "manifest.jsonl")
  out = gcs("data")
  for where in (out, str(tmp_path / "data")):
    assert cli.main(["data", "build", "asr", "--manifest", manifest, "--out", where, "--workers", "1"]) == 0
  name = f"{builders._builders()['asr'].name}/{builders.VERSION}"
  remote, local = _files(f"{out}/{name}"), _files(tmp_path / "data" / name)
  assert remote.keys() == local.keys() and "dataset_info.json" in remote
  assert {k: v for k, v in remote.items() if "array_record" in k} == \
      {k: v for k, v in local.items() if "array_record" in k}
  report = json.loads(epath.Path(out, builders._builders()["asr"].name, builders.REPORT).read_text())
  assert report["status"] == "ok" and report["path"] == f"{out}/{name}"
  # Datasets are read through a gcsfuse mount: a gs:// data dir is a named error.
  with pytest.raises(UserError, match="gcsfuse"):
    from llasm_jax.data import pipeline

    pipeline.Source(f"{out}/{name}")


def test_compilation_cache_serves_a_repeated_run(tmp_path):
  """A second run of the same config loads its train step from the cache in its workdir."""
  from llasm_jax.train.trainer import train

  events = []
  jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    config = tiny_config(stage=1, steps=1)
    config.train.compilation_cache = str(tmp_path / "cache")
    train(config, str(tmp_path / "a"))
    assert os.listdir(tmp_path / "cache")
    before = events.count("/jax/compilation_cache/cache_hits")
    train(config, str(tmp_path / "b"))
    assert events.count("/jax/compilation_cache/cache_hits") > before
    assert jax.config.jax_compilation_cache_dir is None  # train() leaves the process as it found it
    assert compilation_cache.enable("none") is None
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
