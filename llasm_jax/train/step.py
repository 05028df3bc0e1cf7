"""The pure train step: `train_step(state, batch) -> (state, metrics)`, jitted once by the trainer.

Batch (global arrays, B = global batch, G = gradient-accumulation microbatches):
  input_ids int32[B, T], labels int32[B, T] (-100: no loss; HF convention, shifted here),
  attention_mask int32[B, T], positions int32[B, T], mel float32[B, A, M, F], mel_lengths int32[B, A]
The loss is the mean over target tokens of the whole global batch, accumulation included.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llasm_jax.train.optim import TRAIN, keep_new_rows

IGNORE = -100


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Any  # nnx.State of the model's Params (float32 master weights)
  rest: Any  # nnx.State of the other variables (Whisper's fixed positions)
  opt_state: Any
  rng: jax.Array  # uint32[2]: dropout-free today; kept so that resuming is exact when added


def token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy and the number of target tokens (float32 scalars)."""
  logits, targets = logits[:, :-1], labels[:, 1:]
  mask = targets != IGNORE
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, targets, 0))
  return jnp.sum(losses * mask), jnp.sum(mask).astype(jnp.float32)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, labels: Any, *, grad_accum: int,
                    first_new_row: int | None = None):
  """Builds the step function. `labels` marks leaves "train"/"frozen" (only trainable
  gradients are ever read, so XLA never computes the frozen ones); with `first_new_row`
  the embedding rows below it stay frozen."""
  trainable = [lab == TRAIN for lab in jax.tree.leaves(labels)]

  def summed_loss(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    logits, _ = model(batch["input_ids"], batch["mel"], batch["mel_lengths"],
                      attention_mask=batch["attention_mask"], positions=batch["positions"])
    loss, tokens = token_loss(logits, batch["labels"])
    return loss, tokens

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    if grad_accum == 1:
      (loss, tokens), grads = grad_fn(state.params, state.rest, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        (l, n), g = grad_fn(state.params, state.rest, mb)
        return jax.tree.map(jnp.add, carry, (l, n, g)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss, tokens, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    if first_new_row is not None:
      grads = keep_new_rows(grads, first_new_row)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss / denom,
        "target_tokens": tokens,
        "grad_norm": optax.tree.norm([g for g, t in zip(jax.tree.leaves(grads), trainable) if t]),
        "nonfinite_steps": opt_state.total_notfinite,
        "update_applied": opt_state.last_finite,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
