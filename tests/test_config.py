"""Every shipped config in configs/ resolves, and its rules cover every logical axis the model names."""

import ast
import re
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from llasm_jax import sharding
from llasm_jax.config import apply_overrides, llasm_config, load_config_file
from llasm_jax.errors import UserError
from llasm_jax.sharding import MESH_AXES
from llasm_jax.train.sections import training_sections
from llasm_jax.models.llama import RopeScaling
from llasm_jax.models.llasm import Llasm

CONFIGS = sorted((pathlib.Path(__file__).resolve().parent.parent / "configs").glob("*.py"))
# Each file as it loads by default, and with ":stage2" where its docstring runs that stage.
RUNS = [(p, None) for p in CONFIGS] + [(p, "stage2") for p in CONFIGS if f"{p.name}:stage2" in p.read_text()]


def param_axis_names(model: nnx.Module) -> set[str]:
  names = set()
  for _, var in nnx.to_flat_state(nnx.state(model)):
    names.update(a for a in var.get_metadata().get("out_sharding") or () if a is not None)
  return names


def test_configs_found():
  assert {p.stem for p in CONFIGS} >= {"tiny", "tiny_encoder", "llasm_cllama2_7b", "llasm_cllama2_7b_encoder"}


@pytest.mark.parametrize("path, arg", RUNS, ids=lambda x: getattr(x, "stem", x))
def test_config_resolves_and_rules_cover_model(path, arg):
  run = load_config_file(f"{path}:{arg}" if arg else path)
  cfg = llasm_config(run.model)
  rules = tuple(tuple(r) for r in run.logical_axis_rules)
  names = [name for name, _ in rules]
  assert len(names) == len(set(names)), f"{path.name}: a logical axis appears twice in logical_axis_rules"
  for name, axes in rules:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    assert set(axes) <= set(MESH_AXES), f"{path.name}: rule {name!r} -> {axes} names an axis not in the mesh"
  assert set(run.mesh.shape) <= set(MESH_AXES)
  doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  assert re.search(rf"llasm-jax (forward|train) --config configs/{re.escape(path.name)}", doc), \
      f"{path.name}: the module docstring should hold the command that runs it"

  big = cfg.llm.hidden_size > 1024
  # The 7B configs are only traced: eval_shape allocates nothing.
  model = nnx.eval_shape(lambda: Llasm(cfg, rngs=nnx.Rngs(0))) if big else Llasm(cfg, rngs=nnx.Rngs(0))
  missing = param_axis_names(model) - set(names)
  assert not missing, f"{path.name}: logical axes {sorted(missing)} have no entry in logical_axis_rules"

  # Activation names only show up while tracing, where `constrain` turns them into mesh specs:
  # an unmapped name (or one mesh axis used twice in a spec) fails here.
  graphdef, state = nnx.split(model)
  frames = cfg.audio.max_mel_frames if cfg.mode == "llasm" else 400
  p = cfg.audio_tokens(frames)
  t = p + 6

  def forward(state, input_ids, mel, mel_lengths):
    return nnx.merge(graphdef, state)(input_ids, mel, mel_lengths)[0]

  mesh = sharding.make_mesh(run.mesh.shape, devices=jax.devices()[:1])
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    logits = jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, t), jnp.int32),
                            jax.ShapeDtypeStruct((1, 1, cfg.audio.num_mel_bins, frames), jnp.float32),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32))
  assert logits.shape == (1, t, cfg.llm.padded_vocab)  # the padded columns masked (LlamaConfig.vocab_multiple)


def test_overrides_apply():
  cfg = llasm_config(ml_collections.ConfigDict({
      "preset": "tiny",
      "mode": "encoder",
      "stack_factor": 2,
      "audio": {"dtype": "bfloat16"},
      "llm": {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
  }))
  assert cfg.mode == "encoder" and cfg.stack_factor == 2
  assert cfg.audio.dtype == "bfloat16" and cfg.audio.d_model == 64
  assert cfg.llm.rope_theta == 5e5 and cfg.llm.rope_scaling == RopeScaling("llama3", 8.0)


@pytest.mark.parametrize("model, key", [
    ({"preset": "tiny", "bogus": 1}, "bogus"),
    ({"preset": "tiny", "audio": {"d_modle": 32}}, "d_modle"),
    ({"preset": "tiny", "llm": {"hidden": 32}}, "hidden"),
    ({"preset": "tiny", "llm": {"rope_scaling": {"kind": "llama3"}}}, "kind"),
    ({"preset": "no_such_preset"}, "no_such_preset"),
])
def test_unknown_key_raises(model, key):
  with pytest.raises(UserError, match=key):
    llasm_config(ml_collections.ConfigDict(model))


def test_mesh_shape():
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(UserError, match="product 6 != 8"):
    sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(UserError, match="unknown axis 'model'"):
    sharding.mesh_shape({"model": 8}, 8)


@pytest.mark.parametrize("raw, expected", [
    ("adaptor/.*", ("adaptor/.*",)),  # a bare regex: was a SyntaxError traceback from literal_eval
    ("adaptor/.*,llm/.*", ("adaptor/.*", "llm/.*")),
    ('("adaptor/.*", "llm/.*embed_tokens.*")', ("adaptor/.*", "llm/.*embed_tokens.*")),
    ("'llm/.{1,2}'", ("llm/.{1,2}",)),
])
def test_string_tuple_overrides(raw, expected):
  config = training_sections(2)
  run = ml_collections.ConfigDict({"train": config["train"], "data": config["data"]})
  apply_overrides(run, [f"--config.train.trainable={raw}"])
  assert run.train.trainable == expected


def test_typed_overrides():
  run = ml_collections.ConfigDict(training_sections(1))
  apply_overrides(run, ["--config.data.buckets=(128, 256)", "--config.data.system=You are brief.",
                        "--config.train.steps=7", "--config.optim.lr=3e-4", "--config.data.shared_prefix=true"])
  assert run.data.buckets == (128, 256) and run.data.system == "You are brief."
  assert run.train.steps == 7 and run.optim.lr == 3e-4 and run.data.shared_prefix is True
  with pytest.raises(UserError, match="expected strings"):
    apply_overrides(run, ["--config.train.trainable=(1, 2)"])
