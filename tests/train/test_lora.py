"""LoRA (config.train.lora): the layer against merged weights, init, dropout, what trains, model folders."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

from llasm_jax import checkpoint
from llasm_jax.config import llasm_config
from llasm_jax.errors import UserError
from llasm_jax.layers import LoraConfig, dropout_rng, is_lora_path
from llasm_jax.models.llama import LLAMA_PRESETS, LORA_MODULES, LlamaForCausalLM
from llasm_jax.train.optim import lora_config
from tests.train.test_train import tiny_config

ALL = tuple(LORA_MODULES)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)


def flat(model):
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep="/")


def with_params(model, params):
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in params.items()},
                                                               sep="/"))
  nnx.update(model, state)
  return model


def random_factors(params, seed=1, std=0.3):
  """`params` with every LoRA factor drawn at random (B too, so that the update is not zero)."""
  rng = np.random.default_rng(seed)
  return {k: rng.normal(0, std, v.shape).astype(np.float32) if is_lora_path(k) else np.asarray(v)
          for k, v in params.items()}


def merged_reference(params, lora: LoraConfig):
  """The base model's parameters with W + (alpha / r) A B in place of each adapted kernel."""
  out = {k: np.asarray(v) for k, v in params.items() if not is_lora_path(k)}
  for k in params:
    if k.endswith("/lora_a"):
      module = k[:-len("/lora_a")]
      a, b = np.asarray(params[k], np.float64), np.asarray(params[module + "/lora_b"], np.float64)
      out[module + "/kernel"] = (out[module + "/kernel"] + lora.scale * np.einsum("lir,lro->lio", a, b)
                                 ).astype(np.float32)
  return out


@pytest.mark.parametrize("scan", [True, False])
def test_lora_forward_equals_the_merged_weights_forward(scan):
  lora = LoraConfig(rank=4, alpha=8.0, targets=ALL)
  cfg = LLAMA_PRESETS["tiny"].replace(lora=lora, scan_layers=scan)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  params = random_factors(flat(model))
  with_params(model, params)
  base = with_params(LlamaForCausalLM(cfg.replace(lora=LoraConfig()), rngs=nnx.Rngs(0)), merged_reference(params, lora))
  ours, _ = model(IDS)
  ref, _ = base(IDS)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)
  unadapted = with_params(LlamaForCausalLM(cfg.replace(lora=LoraConfig()), rngs=nnx.Rngs(0)),
                          {k: v for k, v in params.items() if not is_lora_path(k)})
  assert np.abs(np.asarray(ours) - np.asarray(unadapted(IDS)[0])).max() > 1e-2  # the update matters


def test_fresh_lora_model_equals_the_base_model_exactly():
  cfg = LLAMA_PRESETS["tiny"]
  base = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  lora = LlamaForCausalLM(cfg.replace(lora=LoraConfig(rank=8, targets=("q_proj", "v_proj", "down_proj"))),
                          rngs=nnx.Rngs(0))
  params = flat(lora)
  # The base kernels draw the same random bits with or without LoRA (same rngs, same order).
  for k, v in flat(base).items():
    np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(v), err_msg=k)
  factors = {k: np.asarray(v) for k, v in params.items() if is_lora_path(k)}
  assert sorted(factors) == sorted(f"model/layers/layers/{m}/{f}" for m in ("self_attn/q_proj", "self_attn/v_proj",
                                                                           "mlp/down_proj") for f in ("lora_a", "lora_b"))
  for k, v in factors.items():
    if k.endswith("lora_b"):
      assert not v.any(), k
    else:  # PEFT's Kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in)), different per layer
      bound = 1 / np.sqrt(v.shape[1])
      assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound and not np.array_equal(v[0], v[1]), k
  np.testing.assert_array_equal(np.asarray(lora(IDS)[0]), np.asarray(base(IDS)[0]))


def test_dropout_only_inside_a_training_step():
  cfg = LLAMA_PRESETS["tiny"].replace(lora=LoraConfig(rank=4, dropout=0.5, targets=ALL))
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  params = random_factors(flat(model))
  with_params(model, params)
  no_dropout = with_params(LlamaForCausalLM(cfg.replace(lora=LoraConfig(rank=4, targets=ALL)), rngs=nnx.Rngs(0)),
                           params)
  run = jax.jit(lambda ids: model(ids)[0])
  evaluation = run(IDS)
  np.testing.assert_array_equal(np.asarray(evaluation), np.asarray(jax.jit(lambda ids: no_dropout(ids)[0])(IDS)))
  outs = []
  for seed in (1, 1, 2):
    with dropout_rng(jax.random.key(seed)):
      outs.append(np.asarray(jax.jit(lambda ids: model(ids)[0])(IDS)))
  np.testing.assert_array_equal(outs[0], outs[1])  # the key decides the masks
  assert np.abs(outs[0] - outs[2]).max() > 1e-3
  assert np.abs(outs[0] - np.asarray(evaluation)).max() > 1e-3
  # Unrolled layers draw the same masks as scanned ones (each layer its own split of the key).
  unrolled = LlamaForCausalLM(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0))
  with_params(unrolled, params)
  with dropout_rng(jax.random.key(1)):
    np.testing.assert_allclose(np.asarray(jax.jit(lambda ids: unrolled(ids)[0])(IDS)), outs[0], atol=1e-5)


def test_config_targets_resolve_to_projections():
  lora = lora_config({"lora": {"rank": 4, "alpha": 8.0, "targets": ("llm/.*(q_proj|v_proj)",)}})
  assert lora == LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
  assert lora_config({"lora": {"rank": 2, "targets": ("llm/.*_proj", "llm/.*mlp")}}).targets == ALL
  assert lora_config({"lora": {"rank": 0, "targets": ("nothing",)}}) == LoraConfig()
  assert lora_config({}) == LoraConfig()  # a config file without the section
  with pytest.raises(UserError, match="matches no LLM projection"):
    lora_config({"lora": {"rank": 4, "targets": ("llm/.*lm_head",)}})
  with pytest.raises(UserError, match="config.train.lora"):
    llasm_config({"preset": "tiny", "llm": {"lora": {"rank": 4}}})
  with pytest.raises(UserError, match="dropout"):
    LoraConfig(rank=4, dropout=1.0, targets=("q_proj",))
  from llasm_jax.config import apply_overrides

  config = tiny_config()
  apply_overrides(config, ["--config.train.lora.rank=8", "--config.train.lora.targets=('llm/.*mlp/.*',)"])
  assert lora_config(config.train) == LoraConfig(rank=8, targets=("gate_proj", "up_proj", "down_proj"))


def test_model_config_round_trips_and_old_folders_load():
  cfg = llasm_config({"preset": "tiny_encoder"})
  cfg = cfg.replace(llm=cfg.llm.replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "o_proj"))))
  d = json.loads(json.dumps(checkpoint.config_to_dict(cfg)))  # as llasm_jax.json stores it
  assert checkpoint.config_from_dict("llasm", d) == cfg
  del d["llm"]["lora"]  # a folder written before LoRA
  assert checkpoint.config_from_dict("llasm", d).llm.lora == LoraConfig()


LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ("llm/.*_proj",)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Stage 2 with LoRA from a converted tiny folder, 3 steps: the first at learning rate 0 (warmup),
  the second moves B only (A's gradient is 0 while B is), the third A too. Returns (the converted
  folders, the workdir, the config)."""
  from llasm_jax.train.trainer import train
  from tests.infer.conftest import make_checkpoints

  root = tmp_path_factory.mktemp("lora")
  ckpts = make_checkpoints(root, mode="encoder")
  config = tiny_config(stage=2, steps=3, lora=LORA)
  config.model = {"preset": "tiny_encoder"}  # the architecture comes from init_from
  config.train.init_from = ckpts["llasm"]
  config.train.checkpoint_every = 3
  config.optim.warmup_steps = 1
  summary = train(config, str(root / "work"))
  assert summary["stop_reason"] == "finished"
  return ckpts, str(root / "work"), config


def test_training_changes_only_the_lora_factors_and_the_adaptor(trained):
  ckpts, work, config = trained
  base = checkpoint.load_params_numpy(ckpts["llasm"])
  after = checkpoint.load_params_numpy(os.path.join(work, "model"))
  factors = sorted(p for p in after if is_lora_path(p))
  assert factors == sorted(f"llm/{LORA_MODULES[m]}/{f}" for m in ALL for f in ("lora_a", "lora_b"))
  assert sorted(set(after) - set(factors)) == sorted(base)
  for path, value in base.items():
    if path.startswith("adaptor/"):
      assert not np.array_equal(value, after[path]), path
    else:  # Whisper and every LLM weight, embeddings and LM head included, as converted
      np.testing.assert_array_equal(value, after[path], err_msg=path)
  # The factors' initial values: A as the trainer drew it (load_model adds them from the seed), B zero.
  meta = checkpoint.read_meta(os.path.join(work, "model"))
  cfg = checkpoint.config_from_dict("llasm", meta["config"])
  fresh, _ = checkpoint.load_model(ckpts["llasm"], cfg=cfg, seed=config.train.seed)
  before = flat(fresh)
  for path in factors:
    if path.endswith("lora_b"):
      assert not np.asarray(before[path]).any() and np.mean(after[path] != 0) > 0.99, path
    else:
      assert np.mean(np.asarray(before[path]) != after[path]) > 0.99, path
  # Adam moments for the adaptor and the factors only (plus scalar counters).
  opt = ocp.StandardCheckpointer().restore(os.path.join(work, "checkpoints", "3", "opt_state"))
  trainable = sum(a.nbytes for p, a in after.items() if p.startswith("adaptor/") or is_lora_path(p))
  big = sum(np.asarray(a).nbytes for a in opt if np.ndim(a) > 0)
  assert big == 2 * trainable, (big, trainable)


def test_generate_from_a_lora_model_folder(trained):
  from llasm_jax.infer.generator import Generator
  from tests.infer.conftest import write_wav

  ckpts, work, _ = trained
  folder = os.path.join(work, "model")
  meta = checkpoint.read_meta(folder)
  assert meta["config"]["llm"]["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": list(ALL)}
  gen = Generator.load(folder)
  assert any(is_lora_path(p) for p in flat(gen.engine.model))
  wav = write_wav(os.path.join(work, "speech.wav"), 1.5)
  [res] = gen.generate(["what is said in this audio?"], audios=[[wav]], max_new_tokens=4)
  assert len(res.token_ids) == 4 or res.finish_reason == "eos"
  [again] = gen.generate(["what is said in this audio?"], audios=[[wav]], max_new_tokens=4)
  assert again.token_ids == res.token_ids  # no dropout outside training


SHARDED = """
import json, os, sys
sys.path.insert(0, os.environ["ROOT"])
from tests.train.test_lora import dropout_run
print("LOSSES " + json.dumps(dropout_run(os.environ["WORK"], {"data": 2, "fsdp": 2, "tensor": 2})))
"""


def dropout_run(workdir, mesh):
  """Losses of 3 steps of LoRA with dropout and 2 accumulated microbatches on `mesh`."""
  from llasm_jax.train.trainer import train

  config = tiny_config(stage=2, steps=3, lora=LORA, grad_accum=2, batch_size=16)
  config.optim.update(warmup_steps=1, lr=1e-2)
  config.mesh.shape = mesh
  return [h["loss"] for h in train(config, workdir)["history"]]


def test_sharded_lora_with_dropout_equals_one_device(tmp_path):
  """The factors shard (fsdp, tensor) and every device draws the same dropout masks as one device."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, ROOT=root, WORK=str(tmp_path / "sharded"), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  run = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  sharded = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("LOSSES "))[len("LOSSES "):])
  one = dropout_run(str(tmp_path / "one"), {"data": 1, "fsdp": 1, "tensor": 1})
  np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=0)
