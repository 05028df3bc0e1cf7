"""The chunked loss (config.train.loss_chunk) against the plain one: the same CE, KL and gradients,
with ignored labels and a K that no chunk size divides, on the tiny LLaMA head (float32 and
bfloat16 compute), and the train step with "ce", "kd" and "mix" giving the same metrics and updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llasm_jax.errors import UserError
from llasm_jax.models.llama import LLAMA_PRESETS, LlamaForCausalLM
from llasm_jax.models.llasm import Llasm
from llasm_jax.train import losses
from llasm_jax.train.setup import prepare
from llasm_jax.train.step import TrainState, make_train_step
from llasm_jax.train.synthetic import synthetic_dataset
from tests.train.test_train import tiny_config

from llasm_jax.tokens import IGNORE


def _inputs(cfg, b=3, k=10, seed=0):
  """Hidden states of student and teacher, HF-style labels with IGNORE, the slots that both have."""
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((b, k, cfg.hidden_size)).astype(np.float32)
  teacher = rng.standard_normal((b, k, cfg.hidden_size)).astype(np.float32)
  labels = rng.integers(0, cfg.vocab_size, (b, k)).astype(np.int32)
  labels[0, 6:] = IGNORE  # a short answer
  labels[2, :] = IGNORE  # a row without any target
  valid = labels != IGNORE
  both = valid & (rng.uniform(size=(b, k)) < 0.7)  # some answer slots the teacher's text lost
  both[1, :] = False  # a row without a teacher
  return jnp.asarray(hidden), jnp.asarray(teacher), jnp.asarray(np.where(valid, labels, 0)), jnp.asarray(valid), \
      jnp.asarray(both)


def _losses_and_grads(model, hidden, teacher, targets, valid, both, chunk, temperature=2.0):
  """(CE, count, KL) and the gradients of CE + 0.7 KL with respect to every weight and the hidden states."""
  graphdef, state = nnx.split(model)

  def objective(state, hidden):
    head = nnx.merge(graphdef, state).logits
    ce, count, kl = losses.token_losses(head, hidden, targets, valid, teacher=teacher, both=both,
                                        temperature=temperature, chunk=chunk)
    return ce + 0.7 * kl, (ce, count, kl)

  (_, values), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(state, hidden)
  return values, jax.tree.leaves(grads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunks_give_the_plain_losses_and_gradients(dtype):
  cfg = LLAMA_PRESETS["tiny"].replace(dtype=dtype)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  args = _inputs(cfg)
  hidden = args[0].astype(dtype)
  (ce, count, kl), grads = _losses_and_grads(model, hidden, *args[1:], chunk=0)
  assert float(count) == 6 + 10 and float(kl) > 0
  # The plain path is the head on all K slots and the two losses, as the step ran them before chunking.
  logits = model.logits(hidden)
  t_logits = jnp.where(args[4][..., None], model.logits(args[1]), 0.0)
  np.testing.assert_allclose(float(ce), float(losses.cross_entropy(logits, args[2], args[3])[0]), rtol=1e-6)
  np.testing.assert_allclose(float(kl), float(losses.distillation_kl(logits, t_logits, args[4], 2.0)), rtol=1e-6)
  # bfloat16 compute: the same per-token products, summed in another order; a weight gradient is
  # then a float32 sum of per-chunk bfloat16 products instead of one bfloat16 product, so the two
  # differ by bfloat16 roundings (2^-8 relative each).
  bf16 = dtype == "bfloat16"
  for chunk in (1, 3, 4, 9, 10, 64):  # 3, 4, 9: K = 10 padded with invalid slots
    (c_ce, c_count, c_kl), c_grads = _losses_and_grads(model, hidden, *args[1:], chunk=chunk)
    # The KL is a small difference of sums of terms near log V: absolute float32 roundings of 1e-6.
    np.testing.assert_allclose([float(c_ce), float(c_kl)], [float(ce), float(kl)], rtol=2e-3 if bf16 else 1e-5,
                               atol=1e-5)
    assert float(c_count) == float(count)
    assert len(c_grads) == len(grads)
    for a, b in zip(c_grads, grads):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      scale = np.abs(b).max()
      np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * scale) if bf16 else \
          np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(scale, 1.0))


def test_without_a_teacher_the_kl_is_zero():
  cfg = LLAMA_PRESETS["tiny"]
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  hidden, _, targets, valid, _ = _inputs(cfg)
  for chunk in (0, 4):
    ce, count, kl = losses.token_losses(model.logits, hidden, targets, valid, chunk=chunk)
    assert float(kl) == 0.0 and float(count) == 16 and float(ce) > 0


def _step(loss, chunk, dtype="float32"):
  """One train step of the tiny model (stage 2 for "ce", stage 1 for the distilling losses) with
  loss_chunk `chunk`: its metrics and the updated parameters."""
  config = tiny_config(stage=2 if loss == "ce" else 1, loss=loss, kd_weight=0.3, kd_temperature=2.0)
  if dtype != "float32":
    config.model = {"preset": "tiny_encoder", "llm": {"dtype": dtype}}
  setup = prepare(config)
  host = next(iter(synthetic_dataset(setup.cfg, config.data, seed=0, host_batch=4, process_index=0, process_count=1,
                                     teacher=loss != "ce")))
  if loss != "ce":  # row 0 without a teacher, as the pipeline leaves audio whose text is unknown
    for k in ("teacher_input_ids", "teacher_attention_mask"):
      host[k][0] = 0
    host["teacher_target_positions"][0] = -1
  _, params, rest = nnx.split(Llasm(setup.cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.labels, grad_accum=1, loss=loss, kd_weight=0.3,
                                 kd_temperature=2.0, loss_chunk=chunk))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=setup.tx.init(params),
                     rng=jnp.zeros((2,), jnp.uint32))
  new, metrics = step(state, {k: jnp.asarray(v) for k, v in host.items()})
  assert host["target_positions"].shape[1] == 40  # K = T: 16 does not divide it
  return {k: float(v) for k, v in metrics.items()}, jax.tree.leaves(new.params)


@pytest.mark.parametrize("loss", ["ce", "kd", "mix"])
def test_the_step_with_chunks_equals_the_plain_step(loss):
  plain, plain_params = _step(loss, 0)
  chunked, chunked_params = _step(loss, 16)
  assert plain["target_tokens"] > 0 and (loss == "ce" or plain["kd"] > 0)
  for k in plain:
    np.testing.assert_allclose(chunked[k], plain[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(chunked_params, plain_params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_the_step_in_bfloat16_with_chunks_is_close_to_the_plain_step():
  plain, _ = _step("ce", 0, dtype="bfloat16")
  chunked, _ = _step("ce", 16, dtype="bfloat16")
  np.testing.assert_allclose([chunked["loss"], chunked["grad_norm"]], [plain["loss"], plain["grad_norm"]], rtol=2e-3)


def test_a_negative_chunk_is_refused():
  with pytest.raises(UserError, match="config.train.loss_chunk -1"):
    prepare(tiny_config(stage=2, loss_chunk=-1))
