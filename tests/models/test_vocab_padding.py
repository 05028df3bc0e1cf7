"""A vocab padded to a multiple (LlamaConfig.vocab_multiple) against the same model unpadded: the
same logits on the real vocab and never a padded token (greedy and sampled), the same losses,
folders that keep the real vocab (old ones load, export round-trips exactly), and on 8 simulated
devices an embedding and LM head split over tensor=2 where the unpadded ones are replicated with a
warning that names the array and its bytes."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from llasm_jax import checkpoint
from llasm_jax.convert.export import export
from llasm_jax.convert.hf import flat_params
from llasm_jax.infer import Engine, SamplingParams
from llasm_jax.models.llama import LLAMA_PRESETS, MASKED_LOGIT, LlamaForCausalLM
from llasm_jax.train import losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 253  # prime: no tensor axis divides it


def _folder(tmp_path, tie=False):
  """A model folder of an unpadded random tiny LLaMA (vocab 253), and that model."""
  cfg = LLAMA_PRESETS["tiny"].replace(vocab_size=VOCAB, tie_word_embeddings=tie, eos_token_id=VOCAB - 1)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(3))
  folder = str(tmp_path / ("tied" if tie else "untied"))
  os.makedirs(folder)
  checkpoint.save_params(folder, "llama", cfg, {k: np.asarray(v) for k, v in flat_params(model).items()},
                         stored_dtype="float32")
  return folder, model


@pytest.mark.parametrize("tie", [False, True])
def test_padded_logits_equal_the_unpadded_on_the_real_vocab(tmp_path, tie):
  folder, plain = _folder(tmp_path, tie)
  padded, _ = checkpoint.load_model(folder, vocab_multiple=128)
  assert padded.cfg.padded_vocab == 256 and padded.model.embed_tokens.embedding.shape == (256, 64)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 9)))
  want, _ = plain(ids)
  got, _ = padded(ids)
  assert want.shape == (2, 9, VOCAB) and got.shape == (2, 9, 256)
  np.testing.assert_allclose(np.asarray(got[..., :VOCAB]), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(got[..., VOCAB:]) == MASKED_LOGIT)


def _engine_outputs(model, sampling):
  prompts = [[1, 5, 9, 200], [1, 17], [1, 250, 3, 4, 8, 99, 100]]
  return [o.token_ids for o in Engine(model).generate(prompts, max_new_tokens=12, sampling=sampling)[0]]


def test_generation_is_the_same_and_never_picks_a_padded_token(tmp_path):
  folder, plain = _folder(tmp_path)
  padded, _ = checkpoint.load_model(folder, vocab_multiple=128)
  assert _engine_outputs(padded, SamplingParams()) == _engine_outputs(plain, SamplingParams())
  # Padded LM-head columns that would win every argmax, and a flat sampler, still give real tokens only.
  kernel = padded.lm_head.kernel
  kernel[...] = kernel[...].at[:, VOCAB:].set(1e4)
  assert _engine_outputs(padded, SamplingParams()) == _engine_outputs(plain, SamplingParams())
  hot = SamplingParams(temperature=50.0, seed=1)
  sampled = _engine_outputs(padded, hot)
  # Real tokens only. (Not the unpadded model's draws: the same distribution, but the sampler's
  # noise has one value per column, so 256 columns draw other numbers than 253.)
  assert max(max(row) for row in sampled) < VOCAB and len({t for row in sampled for t in row}) > 10


def test_losses_and_gradients_equal_the_unpadded(tmp_path):
  folder, plain = _folder(tmp_path)
  padded, _ = checkpoint.load_model(folder, vocab_multiple=128)
  rng = np.random.default_rng(1)
  hidden, teacher = (jnp.asarray(rng.standard_normal((2, 7, 64)).astype(np.float32)) for _ in range(2))
  targets = jnp.asarray(rng.integers(0, VOCAB, (2, 7)))
  valid = jnp.asarray(rng.uniform(size=(2, 7)) < 0.8)

  def run(model, chunk):
    graphdef, state = nnx.split(model)

    def objective(state):
      ce, count, kl = losses.token_losses(nnx.merge(graphdef, state).logits, hidden, targets, valid, teacher=teacher,
                                          both=valid, temperature=1.5, chunk=chunk)
      return ce + kl, (ce, kl)

    (_, values), grads = jax.value_and_grad(objective, has_aux=True)(state)
    return np.asarray(values), grads

  want, want_grads = run(plain, 0)
  for chunk in (0, 3):
    got, grads = run(padded, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = np.asarray(grads["lm_head"]["kernel"][...])
    np.testing.assert_allclose(g[:, :VOCAB], np.asarray(want_grads["lm_head"]["kernel"][...]), rtol=1e-5, atol=1e-6)
    assert np.all(g[:, VOCAB:] == 0)  # masked columns learn nothing


def test_folders_keep_the_real_vocab_and_export_round_trips(tmp_path):
  folder, plain = _folder(tmp_path)
  padded, meta = checkpoint.load_model(folder, vocab_multiple=128)
  # A padded model saved (as training saves its model folder) stores the real vocab.
  again = str(tmp_path / "again")
  os.makedirs(again)
  checkpoint.save_params(again, "llama", padded.cfg, flat_params(padded), stored_dtype="float32")
  stored = checkpoint.load_params_numpy(again)
  original = checkpoint.load_params_numpy(folder)
  assert stored["model/embed_tokens/embedding"].shape == (VOCAB, 64) and stored["lm_head/kernel"].shape == (64, VOCAB)
  assert stored.keys() == original.keys()
  for k in original:
    np.testing.assert_array_equal(stored[k], original[k])
  assert checkpoint.read_meta(again)["config"]["vocab_multiple"] == 128  # a run option: it loads padded again
  assert checkpoint.load_model(again)[0].lm_head.kernel.shape == (64, 256)
  # Export: the HF tensors of the real vocab, bit for bit those of the unpadded model.
  export(again, str(tmp_path / "hf"), progress=False)
  hf = load_file(str(tmp_path / "hf" / "llm" / "model.safetensors"))
  ref = export_reference(folder, tmp_path)
  assert hf.keys() == ref.keys() and hf["lm_head.weight"].shape == (VOCAB, 64)
  for k in ref:
    np.testing.assert_array_equal(hf[k], ref[k])
  assert json.load(open(tmp_path / "hf" / "llm" / "config.json"))["vocab_size"] == VOCAB


def export_reference(folder, tmp_path):
  export(folder, str(tmp_path / "hf_ref"), progress=False)
  return load_file(str(tmp_path / "hf_ref" / "llm" / "model.safetensors"))


def test_an_old_folder_without_the_option_loads(tmp_path):
  folder, plain = _folder(tmp_path)
  meta_path = os.path.join(folder, checkpoint.META_FILE)
  meta = json.load(open(meta_path))
  del meta["config"]["vocab_multiple"]  # written before the option existed
  json.dump(meta, open(meta_path, "w"))
  old, _ = checkpoint.load_model(folder)
  assert old.cfg.vocab_multiple == 1 and old.cfg.padded_vocab == VOCAB
  np.testing.assert_array_equal(np.asarray(old.lm_head.kernel[...]), np.asarray(plain.lm_head.kernel[...]))


SHARDED = textwrap.dedent("""
    import logging, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from llasm_jax import checkpoint, sharding
    from llasm_jax.sharding import DEFAULT_RULES
    logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    folder = sys.argv[1]
    for multiple in (1, 128, 1):  # the second unpadded load warns no more
        model, _ = checkpoint.load_model(folder, mesh=mesh, rules=DEFAULT_RULES, vocab_multiple=multiple)
        emb, head = model.model.embed_tokens.embedding[...], model.lm_head.kernel[...]
        print("SPECS", multiple, emb.shape, emb.sharding.spec, head.sharding.spec, flush=True)
        if multiple == 128:
            single, _ = checkpoint.load_model(folder)
            np.testing.assert_array_equal(np.asarray(emb)[:253], np.asarray(single.model.embed_tokens.embedding[...]))
            np.testing.assert_array_equal(np.asarray(head)[:, :253], np.asarray(single.lm_head.kernel[...]))
            assert not np.asarray(head)[:, 253:].any()
""")


def test_padded_vocab_shards_over_tensor_and_replication_warns(tmp_path):
  folder, _ = _folder(tmp_path)
  out = subprocess.run([sys.executable, "-c", SHARDED, folder], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  specs = [line for line in out.stdout.splitlines() if line.startswith("SPECS")]
  assert specs == ["SPECS 1 (253, 64) P(None, 'fsdp') P('fsdp', None)",
                   "SPECS 128 (256, 64) P('tensor', 'fsdp') P('fsdp', 'tensor')",
                   "SPECS 1 (253, 64) P(None, 'fsdp') P('fsdp', None)"], out.stdout
  warnings = [line for line in out.stderr.splitlines() if "is replicated along mesh axes" in line]
  assert len(warnings) == 2, out.stderr[-3000:]  # once per array, not per load
  emb = next(w for w in warnings if "model/embed_tokens/embedding" in w)
  assert "model/embed_tokens/embedding float32[253, 64] (63.2 KiB)" in emb, emb
  assert "dimension 0 (253) does not divide over mesh axes tensor (2 devices)" in emb
  assert "each device holds 15.8 KiB of it instead of 7.9 KiB" in emb and "vocab_multiple=128" in emb
  assert any("lm_head/kernel float32[64, 253]" in w for w in warnings)


def test_training_with_a_padded_vocab_and_chunks_equals_plain_training(tmp_path):
  """Stage 2 from the same model folder, twice: padded (vocab 256 -> 288) with a chunked loss, and
  plain. The same losses, and model folders with the same arrays at the real vocab."""
  from llasm_jax.models.llasm import LLASM_PRESETS, Llasm
  from llasm_jax.train.trainer import train
  from tests.train.test_train import tiny_config

  cfg = LLASM_PRESETS["tiny_encoder"]
  start = str(tmp_path / "start")
  os.makedirs(start)
  model = Llasm(cfg, rngs=nnx.Rngs(0))
  checkpoint.save_params(start, "llasm", cfg, {k: np.asarray(v) for k, v in flat_params(model).items()},
                         stored_dtype="float32")
  runs = {}
  for name, llm, chunk in (("plain", {}, 0), ("padded", {"vocab_multiple": 96}, 16)):
    config = tiny_config(stage=2, steps=2, init_from=start, loss_chunk=chunk)
    config.model = {"preset": "tiny_encoder", "llm": llm}
    summary = train(config, str(tmp_path / name))
    runs[name] = ([h["loss"] for h in summary["history"]], checkpoint.load_params_numpy(str(tmp_path / name / "model")))
  np.testing.assert_allclose(runs["padded"][0], runs["plain"][0], rtol=1e-5)
  plain, padded = runs["plain"][1], runs["padded"][1]
  assert padded.keys() == plain.keys() and padded["llm/lm_head/kernel"].shape == (64, 256)
  for k in plain:
    np.testing.assert_allclose(padded[k], plain[k], atol=1e-6, err_msg=k)
