"""`convert --mode encoder --adaptor mlp|ultravox`: the projector is recorded, restored and exported."""

import json
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from llasm_jax import checkpoint
from llasm_jax.convert.convert import convert
from llasm_jax.convert.export import export
from llasm_jax.convert.reader import CheckpointError
from llasm_jax.errors import UserError
from tests.convert.test_convert import hf_state, run_mesh_script, tiny_llm, tiny_whisper


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("adaptor_sources")
  tiny_llm("gqa").save_pretrained(root / "llm")
  tiny_whisper().save_pretrained(root / "whisper")
  return root


def features(cfg, seed=0, slots=1, frames=40):
  """Random Whisper-like features float[2, A, S, E] and their lengths (the second audio shorter)."""
  x = np.random.default_rng(seed).normal(0, 1, (2, slots, frames, cfg.audio.d_model)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(np.array([[frames], [frames - 9]], np.int32))


def test_ultravox_output_starts_at_the_size_of_text_embeddings(sources, tmp_path):
  convert(str(sources / "llm"), str(sources / "whisper"), out=str(tmp_path / "ck"), mode="encoder",
          adaptor="ultravox", progress=False)
  model, meta = checkpoint.load_model(str(tmp_path / "ck"))
  cfg = model.cfg
  assert cfg.adaptor == "ultravox" and meta["config"]["adaptor"] == "ultravox"
  emb = np.asarray(model.llm.model.embed_tokens.embedding[...], np.float64)[:cfg.llm.vocab_size]
  per_width = np.sqrt(np.mean(emb ** 2, axis=0))
  # The converted LLM's rows (std 0.02 as transformers draws them), not the random init's.
  np.testing.assert_allclose(np.asarray(model.adaptor.ln_post.weight[...]), per_width, rtol=1e-5)
  embeds, valid = model.adapt(*features(cfg))
  out = np.asarray(embeds)[np.asarray(valid)]
  rms_out, rms_text = np.sqrt(np.mean(out ** 2)), np.sqrt(np.mean(emb ** 2))
  assert rms_text / 1.5 < rms_out < rms_text * 1.5, (rms_out, rms_text)
  # The mlp projector's output is nowhere near: the gap the Ultravox norm closes.
  convert(str(sources / "llm"), str(sources / "whisper"), out=str(tmp_path / "mlp"), mode="encoder",
          progress=False)
  mlp, _ = checkpoint.load_model(str(tmp_path / "mlp"))
  assert mlp.cfg.adaptor == "mlp"
  embeds, valid = mlp.adapt(*features(cfg))
  assert not rms_text / 1.5 < np.sqrt(np.mean(np.asarray(embeds)[np.asarray(valid)] ** 2)) < rms_text * 1.5


@pytest.mark.parametrize("adaptor", ["mlp", "ultravox"])
def test_export_and_convert_back_give_the_same_model(adaptor, sources, tmp_path):
  convert(str(sources / "llm"), str(sources / "whisper"), out=str(tmp_path / "ck"), mode="encoder",
          adaptor=adaptor, progress=False)
  export(str(tmp_path / "ck"), str(tmp_path / "hf"), progress=False)
  config = json.loads((tmp_path / "hf" / "llasm" / "config.json").read_text())
  assert config["llasm_jax_adaptor"] == adaptor and config["llasm_jax_mode"] == "encoder"
  names = sorted(n for n in hf_state(tmp_path / "hf" / "llasm") if "audio_adaptor" in n)
  if adaptor == "ultravox":  # Ultravox's module names, no biases
    assert names == [f"model.audio_adaptor.{n}.weight" for n in ("linear_1", "linear_2", "ln_post", "ln_pre")]
  else:
    assert names == [f"model.audio_adaptor.linear_{i}.{w}" for i in (1, 2) for w in ("bias", "weight")]
  # The adaptor is read back from what the folder records, without --adaptor.
  convert(str(tmp_path / "hf" / "llasm"), str(tmp_path / "hf" / "whisper"), out=str(tmp_path / "back"),
          mode="encoder", progress=False)
  original, back = (checkpoint.load_params_numpy(str(tmp_path / k)) for k in ("ck", "back"))
  assert sorted(original) == sorted(back)
  for k in original:
    np.testing.assert_array_equal(original[k], back[k], err_msg=k)
  a, b = (checkpoint.load_model(str(tmp_path / k))[0] for k in ("ck", "back"))
  assert b.cfg == a.cfg
  feats, lengths = features(a.cfg)
  rows = [[1, 5, 7, a.cfg.audio_start_id] + [a.cfg.audio_patch_id] * int(-(-n // a.cfg.stack_factor))
          + [a.cfg.audio_end_id, 9] for n in np.asarray(lengths)[:, 0]]
  ids = np.array([r + [0] * (len(rows[0]) - len(r)) for r in rows])
  logits = [np.asarray(m(jnp.asarray(ids), audio_features=feats, audio_feature_lengths=lengths)[0]) for m in (a, b)]
  np.testing.assert_array_equal(logits[0], logits[1])
  # Asking for the other projector is refused, naming the one the folder holds.
  other = "mlp" if adaptor == "ultravox" else "ultravox"
  with pytest.raises(CheckpointError, match=f"holds a '{adaptor}' adaptor; convert it with --adaptor {adaptor}"):
    convert(str(tmp_path / "hf" / "llasm"), str(tmp_path / "hf" / "whisper"), out=str(tmp_path / "x"),
            mode="encoder", adaptor=other, progress=False)


def test_bad_adaptor_choices_name_the_fix(sources, tmp_path, capsys):
  from llasm_jax.cli import main

  with pytest.raises(UserError, match="--adaptor 'bogus': expected one of mlp, ultravox"):
    convert(str(sources / "llm"), str(sources / "whisper"), out=str(tmp_path / "x"), mode="encoder",
            adaptor="bogus", progress=False)
  assert main(["convert", "--llm", str(sources / "llm"), "--whisper", str(sources / "whisper"), "--out",
               str(tmp_path / "x"), "--mode", "encoder", "--adaptor", "bogus"]) == 2
  assert "expected one of mlp, ultravox" in capsys.readouterr().err
  with pytest.raises(UserError, match="'encoder'-mode projector; mode 'llasm'"):
    convert(str(sources / "llm"), str(sources / "whisper"), out=str(tmp_path / "x"), adaptor="ultravox",
            progress=False)
  assert not (tmp_path / "x").exists()


def test_cli_convert_ultravox(sources, tmp_path):
  from llasm_jax.cli import main

  assert main(["convert", "--llm", str(sources / "llm"), "--whisper", str(sources / "whisper"), "--out",
               str(tmp_path / "ck"), "--mode", "encoder", "--adaptor", "ultravox"]) == 0
  assert checkpoint.load_model(str(tmp_path / "ck"))[0].cfg.adaptor == "ultravox"


MESH_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx, traverse_util
    from jax.sharding import PartitionSpec as P
    from llasm_jax import checkpoint, sharding
    from llasm_jax.sharding import DEFAULT_RULES
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model, _ = checkpoint.load_model(sys.argv[1], mesh=mesh, rules=DEFAULT_RULES)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep="/")
    spec = lambda p: flat[p].sharding.spec
    assert spec("adaptor/ln_pre/weight") == P(None), spec("adaptor/ln_pre/weight")
    assert spec("adaptor/linear_1/kernel") == P(None, "tensor"), spec("adaptor/linear_1/kernel")
    assert spec("adaptor/linear_2/kernel") == P("tensor", "fsdp"), spec("adaptor/linear_2/kernel")
    assert spec("adaptor/ln_post/weight") == P("fsdp"), spec("adaptor/ln_post/weight")
    x = np.random.default_rng(0).normal(0, 1, (4, 1, 40, model.cfg.audio.d_model)).astype(np.float32)
    n = np.array([[40], [31], [17], [40]], np.int32)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
      sharded = nnx.jit(lambda m, a, b: m.adapt(a, b))(model, jnp.asarray(x), jnp.asarray(n))
    single, _ = checkpoint.load_model(sys.argv[1])
    want = single.adapt(jnp.asarray(x), jnp.asarray(n))
    np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(want[0]), atol=1e-6)
    print("OK")
""")


def test_ultravox_on_an_8_device_mesh(sources, tmp_path):
  """Its parameters placed by the rules table (the SwiGLU splits a "tensor"-sharded width) and the
  sharded adaptor computing what the single-device one does."""
  convert(str(sources / "llm"), str(sources / "whisper"), out=str(tmp_path / "ck"), mode="encoder",
          adaptor="ultravox", progress=False)
  run_mesh_script(MESH_SCRIPT, tmp_path / "ck")
