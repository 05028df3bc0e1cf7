"""`convert` / `export` against tiny random Hugging Face checkpoints written the published ways."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as tf

from llasm_jax import checkpoint
from tests.conftest import assert_close
from llasm_jax.convert.convert import convert
from llasm_jax.convert.export import export
from llasm_jax.convert.reader import CheckpointError, HFCheckpoint
from llasm_jax.errors import UserError
from tests.models.test_llama import BASE, VARIANTS
from tests.models.test_llasm import PATCH, START, END, VOCAB, batch, torch_reference
from tests.models.test_whisper import randomize_biases, tiny_whisper_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_llm(name="gqa", **extra):
  config_cls, kw = VARIANTS[name]
  model = tf.AutoModelForCausalLM.from_config(config_cls(**{**BASE, **kw, **extra})).eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith("bias"):
        p.normal_(0, 0.1)
  return model


def tiny_whisper():
  model = tf.WhisperForConditionalGeneration(tiny_whisper_config()).eval()
  randomize_biases(model)
  return model


def save_bin_shards(state: dict, folder: str, config: dict, shards: int = 2) -> None:
  """The released LLaSM layout: pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json."""
  os.makedirs(folder, exist_ok=True)
  names = list(state)
  weight_map = {}
  for k in range(shards):
    file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
    part = {n: state[n].clone() for n in names[k::shards]}
    torch.save(part, os.path.join(folder, file))
    weight_map.update({n: file for n in part})
  with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)


def hf_state(folder):
  return dict(HFCheckpoint(folder).tensors())


def assert_bit_identical(original: dict, exported: dict):
  assert sorted(original) == sorted(exported)
  for k in original:
    assert original[k].dtype == exported[k].dtype, k
    np.testing.assert_array_equal(original[k], exported[k], err_msg=k)


@pytest.mark.parametrize("name", ["mha", "gqa", "tied", "qwen2_qkv_bias"])
def test_llm_round_trip_is_bit_identical(name, tmp_path):
  tiny_llm(name).save_pretrained(tmp_path / "hf")
  convert(str(tmp_path / "hf"), out=str(tmp_path / "ck"), progress=False)
  export(str(tmp_path / "ck"), str(tmp_path / "back"), progress=False)
  assert_bit_identical(hf_state(tmp_path / "hf"), hf_state(tmp_path / "back" / "llm"))
  # The export is a standard folder that transformers loads.
  tf.AutoModelForCausalLM.from_pretrained(tmp_path / "back" / "llm")


def test_whisper_round_trip_is_bit_identical(tmp_path):
  tiny_whisper().save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # sharded safetensors
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
  convert(whisper_dir=str(tmp_path / "hf"), out=str(tmp_path / "ck"), progress=False)
  export(str(tmp_path / "ck"), str(tmp_path / "back"), progress=False, shard_bytes=200_000)
  assert_bit_identical(hf_state(tmp_path / "hf"), hf_state(tmp_path / "back" / "whisper"))
  tf.WhisperForConditionalGeneration.from_pretrained(tmp_path / "back" / "whisper")


def released_llasm(tmp_path):
  """A tiny LLaSM checkpoint saved the way the released ones are, plus its Whisper folder."""
  whisper = tiny_whisper()
  whisper.save_pretrained(tmp_path / "whisper")
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=4)).eval()
  projector = torch.nn.Linear(64, 48)
  torch.nn.init.normal_(projector.bias, 0, 0.1)
  state = dict(llm.state_dict())
  state["model.mm_projector.weight"] = projector.weight.detach()
  state["model.mm_projector.bias"] = projector.bias.detach()
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)  # old files carry these
  config = llm.config.to_dict()
  config.update(model_type="llaaa", architectures=["LlaaaLlamaForCausalLM"], mm_audio_tower="openai/whisper-large-v2",
                mm_hidden_size=64, audio_token_len=64, use_mm_proj=True)
  save_bin_shards(state, str(tmp_path / "llasm"), config, shards=3)
  with open(tmp_path / "llasm" / "added_tokens.json", "w") as f:
    json.dump({"<au_patch>": PATCH, "<au_start>": START, "<au_end>": END}, f)
  return whisper, llm, projector, state


def test_released_llasm_checkpoint_converts_and_matches_pytorch(tmp_path):
  whisper, llm, projector, state = released_llasm(tmp_path)
  summary = convert(str(tmp_path / "llasm"), str(tmp_path / "whisper"), out=str(tmp_path / "ck"), progress=False)
  assert summary.kind == "llasm"
  model, meta = checkpoint.load_model(str(tmp_path / "ck"))
  cfg = model.cfg
  assert (cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id) == (PATCH, START, END)
  assert cfg.mode == "llasm" and cfg.audio_token_len == 64

  ids, mels, lengths, mask = batch(cfg, [[3000, 3000], [3000]], 3000)
  start = cfg.audio.decoder_start_token_id
  with torch.no_grad():
    audio = [[projector(whisper.model(input_features=torch.tensor(mels[b, a][None]),
                                      decoder_input_ids=torch.full((1, 64), start)).last_hidden_state[0])
              for a in range(int((lengths[b] > 0).sum()))] for b in range(2)]
  ref = torch_reference(llm, audio, ids, mask)
  out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mels), jnp.asarray(lengths),
                         attention_mask=jnp.asarray(mask))[0])
  assert_close(out[mask == 1], ref[mask == 1], atol=1e-4)

  # Back to the released layout and to standard folders, bit for bit.
  export(str(tmp_path / "ck"), str(tmp_path / "back"), progress=False)
  original = {k: v.numpy() for k, v in state.items() if "rotary_emb" not in k}
  assert_bit_identical(original, hf_state(tmp_path / "back" / "llasm"))
  assert_bit_identical({k: v for k, v in original.items() if "mm_projector" not in k},
                       hf_state(tmp_path / "back" / "llm"))
  assert json.load(open(tmp_path / "back" / "llasm" / "added_tokens.json"))["<au_patch>"] == PATCH
  # ... and that layout converts again.
  convert(str(tmp_path / "back" / "llasm"), str(tmp_path / "back" / "whisper"), out=str(tmp_path / "ck2"),
          progress=False)


def test_bfloat16_storage(tmp_path):
  tiny_llm("mha").save_pretrained(tmp_path / "hf")
  convert(str(tmp_path / "hf"), out=str(tmp_path / "ck"), dtype="bfloat16", progress=False)
  params = checkpoint.load_params_numpy(str(tmp_path / "ck"))
  original = hf_state(tmp_path / "hf")
  emb = params["model/embed_tokens/embedding"]
  assert emb.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(emb, original["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16))
  model, _ = checkpoint.load_model(str(tmp_path / "ck"))  # restored into float32 params
  assert model.model.embed_tokens.embedding[...].dtype == jnp.float32


def test_base_llm_plus_whisper_gives_a_stage1_model(tmp_path):
  llm = tiny_llm("tied")
  llm.save_pretrained(tmp_path / "llm")
  tiny_whisper().save_pretrained(tmp_path / "whisper")
  convert(str(tmp_path / "llm"), str(tmp_path / "whisper"), out=str(tmp_path / "ck"), mode="encoder",
          progress=False)
  model, meta = checkpoint.load_model(str(tmp_path / "ck"))
  v = BASE["vocab_size"]
  assert (model.cfg.audio_patch_id, model.cfg.audio_start_id, model.cfg.audio_end_id) == (v, v + 1, v + 2)
  emb = np.asarray(model.llm.model.embed_tokens.embedding[...])
  assert emb.shape[0] == v + 3
  original = llm.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(emb[:v], original)
  np.testing.assert_allclose(emb[v:], np.repeat(original.mean(0, keepdims=True), 3, 0), atol=1e-7)
  assert model.cfg.mode == "encoder" and not hasattr(model.audio, "decoder")


def test_errors_name_the_problem(tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="no config.json"):
    convert(str(tmp_path / "empty"), out=str(tmp_path / "o1"), progress=False)
  with open(tmp_path / "empty" / "config.json", "w") as f:
    json.dump({"model_type": "gpt2"}, f)
  with pytest.raises(CheckpointError, match="no weights"):
    convert(str(tmp_path / "empty"), out=str(tmp_path / "o1"), progress=False)

  llm = tiny_llm("mha")
  llm.save_pretrained(tmp_path / "gpt")
  cfg = json.load(open(tmp_path / "gpt" / "config.json"))
  cfg["model_type"] = "gpt2"
  json.dump(cfg, open(tmp_path / "gpt" / "config.json", "w"))
  with pytest.raises(UserError, match="not supported; supported: llama"):
    convert(str(tmp_path / "gpt"), out=str(tmp_path / "o2"), progress=False)

  whisper, _, _, _ = released_llasm(tmp_path)
  os.remove(tmp_path / "llasm" / "pytorch_model-00002-of-00003.bin")
  with pytest.raises(CheckpointError, match="missing shard files.*00002-of-00003"):
    convert(str(tmp_path / "llasm"), str(tmp_path / "whisper"), out=str(tmp_path / "o3"), progress=False)

  llm.save_pretrained(tmp_path / "wrong")
  cfg = json.load(open(tmp_path / "wrong" / "config.json"))
  cfg["intermediate_size"] = 128
  json.dump(cfg, open(tmp_path / "wrong" / "config.json", "w"))
  with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight.*shape"):
    convert(str(tmp_path / "wrong"), out=str(tmp_path / "o4"), progress=False)
  assert not any(p.startswith(("o1", "o2", "o3", "o4")) for p in os.listdir(tmp_path)), os.listdir(tmp_path)


def test_interrupted_conversion_leaves_nothing_that_looks_valid(tmp_path):
  tiny_llm("mha").save_pretrained(tmp_path / "hf")
  with pytest.raises(KeyboardInterrupt):
    convert(str(tmp_path / "hf"), out=str(tmp_path / "ck"), progress=False,
            _on_tensor=lambda name: (_ for _ in ()).throw(KeyboardInterrupt) if "layers.1" in name else None)
  assert sorted(os.listdir(tmp_path)) == ["hf"]
  tiny_llm("mha").save_pretrained(tmp_path / "hf2")
  convert(str(tmp_path / "hf2"), out=str(tmp_path / "ck"), progress=False)
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert(str(tmp_path / "hf2"), out=str(tmp_path / "ck"), progress=False)


MESH_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx, traverse_util
    from jax.sharding import PartitionSpec as P
    from llasm_jax import checkpoint, sharding
    from llasm_jax.sharding import DEFAULT_RULES
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model, _ = checkpoint.load_model(sys.argv[1], mesh=mesh, rules=DEFAULT_RULES)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep="/")
    host = checkpoint.load_params_numpy(sys.argv[1])
    spec = lambda p: flat[p].sharding.spec
    assert spec("llm/model/layers/layers/self_attn/q_proj/kernel") == P(None, "fsdp", "tensor"), spec("llm/model/layers/layers/self_attn/q_proj/kernel")
    assert spec("llm/model/layers/layers/mlp/down_proj/kernel") == P(None, "tensor", "fsdp")
    # vocab 99 does not divide over tensor=2: that dimension is replicated instead.
    assert spec("llm/model/embed_tokens/embedding") == P(None, "fsdp")
    assert spec("llm/lm_head/kernel") == P("fsdp", None)
    assert spec("adaptor/linear_1/kernel") == P(None, "tensor")
    for p, a in flat.items():
        assert a.sharding.mesh.shape == mesh.shape, p
        np.testing.assert_array_equal(np.asarray(a), host[p], err_msg=p)
    print("OK", len(flat))
""")


def test_restore_onto_8_device_mesh(tmp_path):
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2))
  llm.save_pretrained(tmp_path / "llm")
  tiny_whisper().save_pretrained(tmp_path / "whisper")
  convert(str(tmp_path / "llm"), str(tmp_path / "whisper"), out=str(tmp_path / "ck"), mode="encoder",
          progress=False)
  run_mesh_script(MESH_SCRIPT, tmp_path / "ck")


def run_mesh_script(text: str, folder) -> None:
  """Runs a test script (8 simulated devices need a fresh process) on the model folder; it prints OK."""
  script = folder.parent / "mesh.py"
  script.write_text(text)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.startswith("OK")


def test_cli_convert_and_export(tmp_path, capsys):
  from llasm_jax.cli import main

  tiny_llm("gqa").save_pretrained(tmp_path / "hf")
  assert main(["convert", "--llm", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
  assert "converted" in capsys.readouterr().out
  assert main(["export", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "back")]) == 0
  assert_bit_identical(hf_state(tmp_path / "hf"), hf_state(tmp_path / "back" / "llm"))
  assert main(["convert", "--llm", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
  assert "not a directory" in capsys.readouterr().err
