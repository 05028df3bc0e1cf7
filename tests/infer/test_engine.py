"""Text generation against `transformers` `generate`, compilation counts, sampling and input errors."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from llasm_jax.convert.configs import llama_config_from_hf
from llasm_jax.convert.hf import keymaps, load_tensors
from llasm_jax.errors import UserError
from llasm_jax.infer import Engine, SamplingParams, sample
from llasm_jax.models.llama import LlamaForCausalLM
from tests.conftest import hf_tensors

VOCAB = 96
# Larger init than HF's 0.02 so greedy choices are not near-ties that float32 rounding could flip.
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
KV_HEADS = {"mha": 4, "gqa": 2}
LENGTHS = (5, 13, 8)  # different prompt lengths in one batch: left padding


def build(name, folder):
  torch.manual_seed(len(name))
  hf = tf.LlamaForCausalLM(tf.LlamaConfig(**BASE, num_key_value_heads=KV_HEADS[name])).eval()
  model = LlamaForCausalLM(llama_config_from_hf(hf.config.to_dict()), rngs=nnx.Rngs(0))
  load_tensors(model, hf_tensors(hf, folder).items(), keymaps("llama"))
  return hf, model


@pytest.fixture(scope="module", params=sorted(KV_HEADS))
def pair(request, tmp_path_factory):
  return build(request.param, tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
  """The model of the engine-only tests (one is enough: they do not depend on the head layout)."""
  return build("gqa", tmp_path_factory.mktemp("gqa"))[1]


def prompts(seed=0, lengths=LENGTHS):
  rng = np.random.RandomState(seed)
  return [[1] + rng.randint(3, VOCAB, n - 1).tolist() for n in lengths]


def hf_generate(hf, batch, max_new_tokens, eos=None):
  """`generate` on the left-padded batch (as HF documents for decoder-only models), cut after EOS."""
  t = max(map(len, batch))
  ids = torch.tensor([[0] * (t - len(p)) + p for p in batch])
  mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in batch])
  with torch.no_grad():
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)[:, t:].tolist()
  return [row[:row.index(eos) + 1] if eos in row else row for row in out]


@pytest.mark.parametrize("unstack", [True, False], ids=["unstacked", "stacked"])
def test_greedy_matches_transformers_generate(pair, unstack):
  """Both decode layouts: per-layer copies of the weights and cache (`unstack_decode`, the CPU
  default) and the stacked arrays they replace."""
  hf, model = pair
  batch = prompts()
  free = hf_generate(hf, batch, 14)
  engine = Engine(model, eos_ids=[], unstack_decode=unstack)
  assert engine.unstack_decode == unstack
  outs, timings = engine.generate(batch, max_new_tokens=14)
  assert [o.token_ids for o in outs] == free
  assert [o.prompt_token_ids for o in outs] == batch
  assert all(o.finish_reason == "length" for o in outs)
  assert timings.decode_steps == 13 and timings.generated_tokens == 3 * 14

  # Stop at EOS: take a token that row 0 first produces at step 5 as the EOS id.
  eos = next(tok for i, tok in enumerate(free[0]) if i >= 4 and tok not in free[0][:i])
  ref = hf_generate(hf, batch, 14, eos=eos)
  outs, _ = Engine(model, eos_ids=[eos], unstack_decode=unstack).generate(batch, max_new_tokens=14)
  assert [o.token_ids for o in outs] == ref
  assert outs[0].finish_reason == "eos" and outs[0].token_ids[-1] == eos


@contextlib.contextmanager
def count_compiles():
  """Counts XLA compilations (jax's own event), independently of the engine's trace counter."""
  events = []

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_compilations_do_not_grow_with_generated_tokens(gqa):
  model = gqa
  engine = Engine(model, eos_ids=[])
  # load_tensors leaves numpy parameters: placed on the device once, not copied at every call.
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(engine.llm_state))
  batch = prompts(1)
  engine.generate(batch, max_new_tokens=2)  # compiles prefill and decode for this bucket
  assert engine.traces == {"prefill": 1, "decode": 1}
  with count_compiles() as compiles:
    long, _ = engine.generate(batch, max_new_tokens=16)  # 8x the tokens, same (batch, length) bucket
    streamed, _ = engine.generate(batch, max_new_tokens=16, callback=lambda rows: None)  # 15 decode calls
    chunked, _ = engine.generate(batch, max_new_tokens=16, callback=lambda rows: None, chunk_tokens=4)
  assert compiles == [], f"{len(compiles)} compilations after the first call"
  assert engine.traces == {"prefill": 1, "decode": 1}
  assert [o.token_ids for o in streamed] == [o.token_ids for o in long] == [o.token_ids for o in chunked]


def test_callback_streams_and_stops_rows(gqa):
  model = gqa
  engine = Engine(model, eos_ids=[])
  batch = prompts(2)
  full, _ = engine.generate(batch, max_new_tokens=10)
  seen = []

  def callback(rows):
    seen.append([len(r) for r in rows])
    return [len(r) >= 4 if b == 1 else False for b, r in enumerate(rows)]

  outs, _ = engine.generate(batch, max_new_tokens=10, callback=callback)
  assert seen[0] == [1, 1, 1] and seen[-1] == [10, 4, 10]  # one token per call
  assert outs[1].token_ids == full[1].token_ids[:4] and outs[1].finish_reason == "stop"
  assert outs[0].token_ids == full[0].token_ids and outs[0].finish_reason == "length"


def test_sampling_is_seeded_and_filters_reduce_to_greedy(gqa):
  model = gqa
  engine = Engine(model, eos_ids=[])
  batch = prompts(3)
  greedy = [o.token_ids for o in engine.generate(batch, max_new_tokens=12)[0]]

  def run(**kw):
    return [o.token_ids for o in engine.generate(batch, max_new_tokens=12, sampling=SamplingParams(**kw))[0]]

  a = run(temperature=1.0, seed=7)
  assert a == run(temperature=1.0, seed=7)
  assert a != run(temperature=1.0, seed=8)
  assert a != greedy
  assert run(temperature=1.5, top_k=1, seed=3) == greedy
  assert run(temperature=1.5, top_p=1e-6, seed=3) == greedy
  assert engine.traces == {"prefill": 2, "decode": 2}  # greedy and sampling: one each, whatever the values


def test_sample_keeps_exactly_the_filtered_tokens():
  logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
  keys = jax.random.split(jax.random.key(0), 2000)

  def support(top_k, top_p):
    draw = jax.vmap(lambda k: sample(logits, k, jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p), greedy=False))
    out = np.asarray(draw(keys))
    return [sorted(set(out[:, b].tolist())) for b in range(2)]

  assert support(0, 1.0) == [[0, 1, 2, 3], [0, 1, 2, 3]]
  assert support(2, 1.0) == [[0, 1], [2, 3]]
  assert support(0, 0.65) == [[0, 1], [2, 3]]  # 0.4 + 0.3 reaches 0.65; 0.4 alone does not
  assert support(0, 0.7) == [[0, 1], [2, 3]]
  assert support(0, 0.75) == [[0, 1, 2], [1, 2, 3]]
  assert support(3, 0.5) == [[0, 1], [2, 3]]
  greedy = sample(logits, keys[0], jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0), greedy=True)
  assert np.asarray(greedy).tolist() == [0, 3]


def test_input_errors_name_the_problem(gqa):
  model = gqa
  engine = Engine(model)
  with pytest.raises(UserError, match="prompt 1 is empty"):
    engine.generate([[1, 2], []])
  with pytest.raises(UserError, match=f"token id {VOCAB} is outside the vocab"):
    engine.generate([[1, VOCAB]])
  with pytest.raises(UserError, match="max_new_tokens 0"):
    engine.generate([[1]], max_new_tokens=0)
  with pytest.raises(UserError, match="text-only LLM; it cannot take audio"):
    engine.generate([[1, 5]], [[np.zeros((80, 100), np.float32)]])
  with pytest.raises(UserError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(UserError, match="Whisper-only checkpoint"):
    Engine(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
