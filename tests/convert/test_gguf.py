"""GGUF -> llasm_jax: tiny files written here with `gguf.GGUFWriter` against the PyTorch model they came
from, and the registry's SmolLM2-135M-Instruct (Q4_1) against transformers and llama.cpp.

The tiny files are written the way llama.cpp's `convert_hf_to_gguf.py` writes LLaMA: q and k
rows permuted for its RoPE kernel, Llama 3 scaling as a `rope_freqs` tensor, so comparing with
the source `LlamaForCausalLM` checks the whole path (transformers' un-permutation included)
against a reference that never saw GGUF. SmolLM2 is converted once together with Whisper
tiny.en (CT2) into a fresh "encoder"-mode LLaSM model, which covers the mixed-format convert.
"""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from llasm_jax import checkpoint
from llasm_jax.convert import registry
from llasm_jax.convert.convert import convert, plan
from llasm_jax.tokens import MARKERS
from llasm_jax.convert.ct2 import CT2Whisper
from llasm_jax.convert.export import export
from llasm_jax.convert.reader import CheckpointError
from tests.conftest import assert_close
from tests.infer.conftest import tiny_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package writes and reads the GGUF files")
TOL = 1e-4
CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row order (its `convert_hf_to_gguf.py` LlamaModel.permute)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(head_dim, theta, factor, low, high, old) -> np.ndarray:
  """The `rope_freqs` tensor llama.cpp's converter writes for Llama 3 RoPE scaling: per frequency,
  the unscaled inverse frequency over transformers' llama3 one (its divisor)."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  config = tf.LlamaConfig(hidden_size=head_dim, num_attention_heads=1, rope_parameters=dict(
      rope_type="llama3", rope_theta=theta, factor=factor, low_freq_factor=low, high_freq_factor=high,
      original_max_position_embeddings=old))
  scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
  plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)  # as transformers
  return (plain / scaled).numpy().astype(np.float32)


def write_gguf(path, model: tf.LlamaForCausalLM, tok, *, f16=(), rope_freqs=None, original_context=None):
  """`model` and `tok` as a GGUF file; tensors named in `f16` are stored as float16."""
  c = model.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_name("tiny test llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  w.add_vocab_size(c.vocab_size)
  if original_context is not None:
    w.add_rope_scaling_orig_ctx_len(original_context)
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  backend = json.loads(tok.backend_tokenizer.to_str())
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list([t for t, _ in vocab])
  w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t, _ in vocab])
  w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
  w.add_bos_token_id(tok.bos_token_id)
  w.add_eos_token_id(tok.eos_token_id)
  w.add_unk_token_id(tok.unk_token_id)
  w.add_add_bos_token(True)
  w.add_chat_template(CHAT)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
  for i in range(c.num_hidden_layers):
    names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
  for hf, name in names.items():
    if hf not in sd:
      continue  # tied lm_head: llama.cpp stores no output.weight
    array = sd[hf]
    if name.endswith("attn_q.weight"):
      array = llama_cpp_permute(array, c.num_attention_heads)
    elif name.endswith("attn_k.weight"):
      array = llama_cpp_permute(array, c.num_key_value_heads)
    w.add_tensor(name, array.astype(np.float16) if hf in f16 else array)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", rope_freqs)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def tiny_llama(tok, **extra):
  torch.manual_seed(0)
  cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=0.1, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, **extra)
  return tf.LlamaForCausalLM(cfg).eval()


def torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def our_llm_logits(ckpt, ids):
  model, meta = checkpoint.load_model(ckpt)
  llm = model if meta["kind"] == "llama" else model.llm
  return np.asarray(llm(jnp.asarray(ids))[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny untied GQA LLaMA written as GGUF (one tensor float16), converted; our logits on `ids`."""
  root = tmp_path_factory.mktemp("gguf")
  tok = tiny_tokenizer()
  model = tiny_llama(tok, tie_word_embeddings=False)
  path = write_gguf(root / "tiny.gguf", model, tok, f16=("model.layers.1.mlp.up_proj.weight",))
  with torch.no_grad():  # the reference holds the float16 tensor's rounded values, as the file does
    up = model.model.layers[1].mlp.up_proj.weight
    up.copy_(up.to(torch.float16).float())
  convert(path, out=str(root / "ck"), progress=False)
  ids = np.random.RandomState(0).randint(3, len(tok), (2, 12))
  return model, tok, path, str(root / "ck"), root, ids, our_llm_logits(str(root / "ck"), ids)


def test_tiny_gguf_matches_the_pytorch_model_it_was_written_from(tiny):
  model, tok, _, ck, _, ids, ours = tiny
  assert_close(ours, torch_logits(model, ids), atol=TOL)
  meta = checkpoint.read_meta(ck)
  assert meta["kind"] == "llama" and meta["source_formats"] == {"llm": "gguf"}
  c = meta["config"]
  assert (c["num_key_value_heads"], c["tie_word_embeddings"], c["vocab_size"]) == (2, False, len(tok))


def test_tiny_gguf_keeps_the_tokenizer_and_chat_template(tiny):
  _, tok, _, ck, root, ids, ours = tiny
  saved = tf.AutoTokenizer.from_pretrained(ck)
  for text in ("the quick brown fox", "hello world, what is said?", "please transcribe  the speech"):
    assert saved.decode(saved.encode(text, add_special_tokens=False)) == text
    assert saved.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False), text
  assert saved.chat_template == CHAT
  assert json.load(open(os.path.join(ck, "generation_config.json")))["eos_token_id"] == tok.eos_token_id
  # export: an ordinary folder that transformers loads, with equal logits.
  export(ck, str(root / "hf"), progress=False)
  hf = tf.AutoModelForCausalLM.from_pretrained(root / "hf" / "llm").eval()
  assert_close(torch_logits(hf, ids), ours, atol=TOL)
  assert tf.AutoTokenizer.from_pretrained(root / "hf" / "llm").chat_template == CHAT


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_written_out_parameter_names_cover_the_transformers_model(model_type):
  # GGUF reading lists the HF names without building a PyTorch model: they must be the model's own.
  from llasm_jax.convert.gguf import hf_parameter_names

  config = tf.AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
  with torch.device("meta"):
    names = set(tf.AutoModelForCausalLM.from_config(config).state_dict())
  assert names <= set(hf_parameter_names(3))


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
  tok = tiny_tokenizer()
  rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=256)
  model = tiny_llama(tok, tie_word_embeddings=True, rope_parameters=rope)
  freqs = llama3_rope_freqs(16, 10000.0, 8.0, 1.0, 4.0, 256)
  assert (freqs == 8.0).sum() >= 2 and (freqs == 1.0).sum() >= 2  # the test scales some frequencies, not all
  path = write_gguf(tmp_path / "l3.gguf", model, tok, rope_freqs=freqs, original_context=256)
  convert(path, out=str(tmp_path / "ck"), progress=False)
  assert checkpoint.read_meta(str(tmp_path / "ck"))["config"]["rope_scaling"] == {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 256}
  ids = np.random.RandomState(2).randint(3, len(tok), (1, 40))
  assert_close(our_llm_logits(str(tmp_path / "ck"), ids), torch_logits(model, ids), atol=TOL)

  wrong = freqs.copy()
  wrong[3] *= 1.5
  write_gguf(tmp_path / "bad.gguf", model, tok, rope_freqs=wrong, original_context=256)
  with pytest.raises(CheckpointError, match="rope_freqs tensor is not Llama 3 RoPE scaling"):
    convert(str(tmp_path / "bad.gguf"), out=str(tmp_path / "o"), progress=False)


def test_errors_name_the_problem(tiny, tmp_path):
  path = tiny[2]
  w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(CheckpointError, match=r"GGUF architecture 'gemma' is not supported; supported: llama .*qwen2"):
    convert(str(tmp_path / "g.gguf"), out=str(tmp_path / "o"), progress=False)
  os.makedirs(tmp_path / "two")
  for name in ("a.gguf", "b.gguf"):
    os.symlink(path, tmp_path / "two" / name)
  with pytest.raises(CheckpointError, match=r"holds 2 \.gguf files \['a\.gguf', 'b\.gguf'\]"):
    convert(str(tmp_path / "two"), out=str(tmp_path / "o"), progress=False)
  with pytest.raises(CheckpointError, match="LLM checkpoint given as --whisper; pass it with --llm"):
    convert(whisper_dir=path, out=str(tmp_path / "o"), progress=False)
  (tmp_path / "x.bin").write_bytes(b"\0" * 16)
  with pytest.raises(CheckpointError, match="a file that is not GGUF"):
    convert(str(tmp_path / "x.bin"), out=str(tmp_path / "o"), progress=False)
  assert not os.path.exists(tmp_path / "o")


def test_plan_is_pure(tiny):
  path = tiny[2]
  before = sorted(os.listdir(os.path.dirname(path)))
  p = plan(path, None, "llasm")
  assert p.kind == "llama" and p.tokenizer is None and not p.extra
  assert [(role, src.format) for role, src, _ in p.sources] == [("llm", "gguf")]
  with pytest.raises(Exception):
    p.kind = "whisper"  # frozen
  assert sorted(os.listdir(os.path.dirname(path))) == before


# ---- the registry's SmolLM2 + Whisper tiny.en -------------------------------------------------------

SMOLLM2, TINY_EN = registry.smollm2_gguf(), registry.whisper_tiny_en_ct2()
needs_wheels = pytest.mark.skipif(SMOLLM2 is None or TINY_EN is None, reason="registry wheels absent: "
                                  + registry.INSTALL_HINT)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "2 + 2 ="]
# SmolLM2's logits reach |40| after 30 layers: transformers' own float32 run is ~1e-4 from its
# float64 run on these prompts (measured 9.3e-5), so float32 agreement is checked at 3e-4.
SMOL_TOL = 3e-4


@contextlib.contextmanager
def one_torch_thread():
  """PyTorch on one thread: with the suite's workers sharing 2 cores, two threads per reference
  run were measured 3x slower than one."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
  """SmolLM2 (GGUF) + Whisper tiny.en (CT2) -> a fresh encoder-mode LLaSM model, exported back;
  the chat prompts' ids, and our LLM's logits on them (cut to the shortest prompt: one batch)."""
  from llasm_jax.infer.generator import Generator

  root = tmp_path_factory.mktemp("smol")
  convert(SMOLLM2, TINY_EN, out=str(root / "ck"), mode="encoder", progress=False)
  export(str(root / "ck"), str(root / "hf"), progress=False)
  tok = tf.AutoTokenizer.from_pretrained(root / "ck")
  texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
           for p in PROMPTS]
  ids = [tok.encode(t, add_special_tokens=False) for t in texts]
  gen = Generator.load(root / "ck")
  batch = np.array([p[:min(map(len, ids))] for p in ids])
  logits = np.asarray(gen.engine.model.llm(jnp.asarray(batch))[0])
  return dict(ck=str(root / "ck"), hf=str(root / "hf"), tok=tok, ids=ids, gen=gen, batch=batch, logits=logits)


@needs_wheels
def test_smollm2_fresh_llasm_model(smol):
  ck, hf, tok = smol["ck"], smol["hf"], smol["tok"]
  meta = checkpoint.read_meta(ck)
  cfg = meta["config"]
  assert meta["kind"] == "llasm" and cfg["mode"] == "encoder"
  assert meta["source_formats"] == {"llm": "gguf", "whisper": "ctranslate2"}
  assert (cfg["audio_patch_id"], cfg["audio_start_id"], cfg["audio_end_id"]) == (49152, 49153, 49154)
  assert [tok.convert_tokens_to_ids(t) for t in MARKERS] == [49152, 49153, 49154]
  llm = cfg["llm"]
  assert (llm["num_hidden_layers"], llm["num_attention_heads"], llm["num_key_value_heads"], llm["vocab_size"],
          llm["tie_word_embeddings"]) == (30, 9, 3, 49155, True)
  assert cfg["audio"]["d_model"] == 384 and cfg["audio"]["num_mel_bins"] == 80
  params = checkpoint.load_params_numpy(ck)
  emb = params["llm/model/embed_tokens/embedding"]
  np.testing.assert_allclose(emb[49152:], np.repeat(emb[:49152].astype(np.float64).mean(0, keepdims=True), 3, 0),
                             atol=1e-7)
  # Whisper's encoder is CT2's float16 values widened exactly; its decoder is left out ("encoder" mode).
  conv = CT2Whisper(TINY_EN).file.raw("encoder/conv2/weight")
  assert conv.dtype == np.float16
  np.testing.assert_array_equal(params["audio/encoder/conv2/kernel"], np.transpose(conv, (2, 1, 0)).astype(np.float32))
  assert not any(k.startswith("audio/decoder") for k in params)
  assert tf.AutoTokenizer.from_pretrained(os.path.join(hf, "llm")).chat_template.startswith("{% for message")
  assert tf.AutoTokenizer.from_pretrained(os.path.join(ck, checkpoint.WHISPER_DIR)).decode([50257]) \
      == "<|startoftranscript|>"

  # Every GGML block type in the file (Q8_0 embedding, Q4_1 projections) dequantizes to the values of
  # transformers' own torch reader and dequantizer, independent of the gguf package's numpy ones; the
  # k rows come back from llama.cpp's order.
  greader = pytest.importorskip("transformers.integrations.gguf.reader")
  dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
  header = greader.GgufHeader.from_file(SMOLLM2)
  raw = greader.load_gguf_state_dict(header)
  types, shapes = header.ggml_types, {info.name: info.shape for info in header.tensors}

  def theirs(name):
    return dequant.dequantize(raw[name][None], types[name]).reshape(shapes[name]).numpy()

  np.testing.assert_array_equal(emb[:49152], theirs("token_embd.weight"))
  layer = "llm/model/layers/layers/self_attn"
  np.testing.assert_array_equal(params[f"{layer}/v_proj/kernel"][3], theirs("blk.3.attn_v.weight").T)
  k = theirs("blk.3.attn_k.weight")  # [3 kv heads x 64, 576] in llama.cpp's row order
  np.testing.assert_array_equal(llama_cpp_permute(params[f"{layer}/k_proj/kernel"][3].T, 3), k)
  assert {types["token_embd.weight"], types["blk.3.attn_k.weight"]} == {8, 3}  # Q8_0, Q4_1


@needs_wheels
def test_smollm2_logits_and_greedy_decoding_match_transformers(smol):
  hf = tf.AutoModelForCausalLM.from_pretrained(os.path.join(smol["hf"], "llm"), dtype=torch.float32).eval()
  with one_torch_thread():
    assert_close(smol["logits"], torch_logits(hf, smol["batch"]), atol=SMOL_TOL)
    prompts = [smol["ids"][0], smol["ids"][2]]
    results = smol["gen"].generate(prompts, max_new_tokens=16)
    with torch.no_grad():
      for ids, res in zip(prompts, results):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=2,
                          pad_token_id=2)[0, len(ids):].tolist()
        assert res.token_ids == ref, (smol["tok"].decode(res.token_ids), smol["tok"].decode(ref))
  assert "Paris" in results[0].text, results[0].text


# llama.cpp's logits of a GGUF file (argv[1]) on token ids (argv[2], JSON), saved as .npy (argv[3]).
LLAMA_CPP_LOGITS = """
import json, sys
import numpy as np
import llama_cpp
ids = json.loads(sys.argv[2])
model = llama_cpp.Llama(sys.argv[1], n_ctx=128, logits_all=True, verbose=False, n_threads=1, seed=0)
model.eval(ids)
np.save(sys.argv[3], np.asarray(model.scores[:len(ids)], np.float32))
"""


def run_reference(module: str, code: str, *args: str, timeout: float = 600) -> None:
  """Runs a native reference's `code` in a child Python (`args` as its argv[1:]); skips the test
  if `module` is not installed or the child does not finish cleanly. A native build made for CPU
  features this machine lacks dies with SIGILL ("Fatal Python error: Illegal instruction"); in
  process that took the whole pytest worker down, here it costs one skipped reference."""
  if importlib.util.find_spec(module) is None:
    pytest.skip(f"reference {module!r} not installed")
  try:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    pytest.skip(f"reference {module!r} did not finish in {timeout:g} s")
  if proc.returncode:
    how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
           else f"exit status {proc.returncode}")
    tail = " | ".join(proc.stderr.strip()[-600:].splitlines())  # one line in pytest's skip summary
    pytest.skip(f"reference {module!r} could not run ({how}): {tail}")


def test_a_reference_that_crashes_skips_the_test():
  # The child kills itself the way an illegal instruction would; json stands in for the native module.
  with pytest.raises(pytest.skip.Exception, match=r"'json' could not run \(killed by SIGILL\)"):
    run_reference("json", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
  with pytest.raises(pytest.skip.Exception, match=r"exit status 1\): .*ValueError: bad build"):
    run_reference("json", "raise ValueError('bad build')")
  with pytest.raises(pytest.skip.Exception, match="'no_such_reference_module' not installed"):
    run_reference("no_such_reference_module", "pass")
  run_reference("json", "import json")  # a clean run returns


@needs_wheels
def test_smollm2_against_llama_cpp(smol, tmp_path):
  """llama.cpp runs the GGUF itself (its quantized kernels, so only close): the next-token
  choices agree, which a wrong q/k row order or dequantization would break. llama-cpp-python is
  not in the test extras (it compiles llama.cpp from source): without it this test skips."""
  ids = smol["batch"][0].tolist()
  run_reference("llama_cpp", LLAMA_CPP_LOGITS, SMOLLM2, json.dumps(ids), str(tmp_path / "logits.npy"))
  theirs = np.load(tmp_path / "logits.npy")
  ours = smol["logits"][0, :, :theirs.shape[1]]
  agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
  corr = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
  assert agree >= 0.9 and corr > 0.99, (agree, corr, float(np.abs(ours - theirs).max()))


@pytest.mark.slow
@needs_wheels
def test_smollm2_matches_transformers_loading_the_gguf(smol):
  """The reference the brief names: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`
  (~40 s on 2 CPU cores, hence slow; the default run compares with the exported folder)."""
  pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
  hf = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2),
                                               dtype=torch.float32).eval()
  with one_torch_thread():
    assert_close(smol["logits"][..., :49152], torch_logits(hf, smol["batch"]), atol=SMOL_TOL)
    prompt = smol["ids"][1]
    [res] = smol["gen"].generate([prompt], max_new_tokens=16)
    with torch.no_grad():
      ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=2,
                        pad_token_id=2)[0, len(prompt):].tolist()
  assert res.token_ids == ref
