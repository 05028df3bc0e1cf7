"""Token losses over the positions that carry a target: cross-entropy and distillation KL; and
the adaptor's CTC loss against each row's transcript (`ctc_feasible`, `ctc_loss`).

Legend: B batch, T length, K target slots per row (static), C slots per chunk, D width, V vocab
(padded: LlamaConfig.padded_vocab, its extra logits masked by the head).

Labels follow the HF convention (unshifted, -100 = no loss): the logits at position t predict
labels[t + 1]. The batch's `target_positions` (llasm_jax/data/contract.py) list, per row, the
positions whose next token is a target; the LM head runs on those K slots only instead of all
T (in stage 1 about one position in eight carries a loss, and the head of a small LLM is a
fifth of its matmuls).

`token_losses` runs the head and the losses C slots at a time (config.train.loss_chunk), each
chunk recomputed in the backward pass, as levanter's blockwise cross-entropy and MaxText's
vocab tiling do: float32[B, K, V] logits (with K = T = 2048 and a 128k vocab, 1 GiB per row and
as much again for their gradient) never exist whole, only float32[B, C, V].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from llasm_jax.errors import UserError


def gather(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x float[B, T, D], positions int[B, K] -> float[B, K, D]."""
  return jnp.take_along_axis(x, positions[..., None], axis=1)


def cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits float[B, K, V], targets int[B, K], valid bool[B, K] -> (summed CE, target count), float32."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid).astype(jnp.float32)


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, valid: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
  """Summed KL(teacher || student) between next-token distributions, float32 scalar.

  student_logits, teacher_logits float[B, K, V] at matching target slots (the i-th response
  token of a row in both); valid bool[B, K]. The teacher is constant (no gradient reaches it).
  Scaled by temperature^2 so gradients keep their size across temperatures (Hinton et al.).
  """
  t = temperature
  teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return jnp.sum(jnp.where(valid, kl, 0.0)) * t * t


def token_losses(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, valid: jax.Array,
                 *, teacher: jax.Array | None = None, both: jax.Array | None = None, temperature: float = 1.0,
                 chunk: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed CE, target count, summed KL), float32 scalars, from final hidden states at the target slots.

  head: float[B, C, D] -> float32[B, C, V], the LM head (`LlamaForCausalLM.logits`); hidden
  float[B, K, D] the student's states, targets int[B, K], valid bool[B, K]. With a teacher
  (float[B, K, D], its states at the matching slots, constant) also the KL on `both` bool[B, K];
  without, the KL is 0. `chunk` > 0: C = chunk slots per step of a scan whose body is
  rematerialized (K padded to a multiple of C with invalid slots); 0 or C >= K: one piece.
  """
  def piece(h, tgt, ok, th, both_ok):
    logits = head(h)
    ce, count = cross_entropy(logits, tgt, ok)
    if th is None:
      return ce, count, jnp.zeros((), jnp.float32)
    t_logits = head(jax.lax.stop_gradient(th))
    # Rows without a teacher are all padding: their logits mean nothing (a fully masked row may be
    # NaN under some attention kernels; XLA's gives finite values), and zeros keep them out of the
    # KL's gradient, where a NaN would survive the mask (0 * NaN).
    t_logits = jnp.where(both_ok[..., None], t_logits, 0.0)
    return ce, count, distillation_kl(logits, t_logits, both_ok, temperature)

  k = hidden.shape[1]
  if chunk <= 0 or chunk >= k:
    return piece(hidden, targets, valid, teacher, both)
  pad = -k % chunk

  def chunks(x, fill):
    """[B, K, ...] -> [K / C, B, C, ...] (padded with `fill`): the scan runs over the first axis."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.swapaxes(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 0, 1)

  xs = (chunks(hidden, 0), chunks(targets, 0), chunks(valid, False),
        None if teacher is None else chunks(teacher, 0), None if teacher is None else chunks(both, False))
  # Nothing of a chunk is kept for the backward pass but its inputs: its logits are computed again there.
  body = jax.checkpoint(lambda args: piece(*args), prevent_cse=False)

  def step(total, args):
    return jax.tree.map(jnp.add, total, body(args)), None

  zero = jnp.zeros((), jnp.float32)
  (ce, count, kl), _ = jax.lax.scan(step, (zero, zero, zero), xs)
  return ce, count, kl


def ctc_repeats(labels: jax.Array, lengths: jax.Array) -> jax.Array:
  """labels int[N, U], lengths int[N] -> int32[N]: adjacent equal labels within each length, each of
  which needs a blank frame between its two tokens."""
  u = labels.shape[1]
  inside = jnp.arange(1, u)[None, :] < jnp.minimum(lengths, u)[:, None]
  return jnp.sum(inside & (labels[:, 1:] == labels[:, :-1]), axis=1).astype(jnp.int32)


def ctc_feasible(labels: jax.Array, lengths: jax.Array, frames: jax.Array) -> jax.Array:
  """bool[N]: rows whose transcript CTC can align to their frames: labels int[N, U] (the first
  lengths[n] count; a length past U means the labels were cut), frames int[N] valid frames per
  row. A row without labels (length 0: no audio, or no known text) is not feasible either: it has
  no CTC loss, nor is it counted as infeasible (see `ctc_loss`)."""
  u = labels.shape[1]
  return (lengths > 0) & (lengths <= u) & (lengths + ctc_repeats(labels, lengths) <= frames)


def ctc_classes(labels: jax.Array, lengths: jax.Array, key: jax.Array, negatives: int,
                vocab: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The classes of a sampled CTC softmax: every token the batch's transcripts hold, and `negatives`
  random other tokens of the vocab (as sampled-softmax LMs do: the full [N, S, V] logits of a
  49k vocab cost as much as the LLM pass the warm phase skips).

  labels int[N, U] (the first lengths[n] of each row count), key a PRNG key -> classes int32[C]
  (C = N * U + negatives), their validity bool[C] (padding, and negatives drawn twice or equal to
  a target, are not classes), and the labels as indices into `classes`. Exact when the classes
  cover the vocab: the softmax is then the full one."""
  n, u = labels.shape
  inside = jnp.arange(u)[None, :] < jnp.minimum(lengths, u)[:, None]
  # Sorted unique targets, padded with `vocab` (past every id, so the padding sorts last).
  targets = jnp.unique(jnp.where(inside, labels, vocab).reshape(-1), size=n * u, fill_value=vocab)
  noise = jnp.sort(jax.random.randint(key, (negatives,), 0, vocab))
  repeated = jnp.concatenate([jnp.zeros((1,), bool), noise[1:] == noise[:-1]])
  fresh = ~repeated & (targets[jnp.clip(jnp.searchsorted(targets, noise), 0, n * u - 1)] != noise)
  classes = jnp.concatenate([targets, noise]).astype(jnp.int32)
  class_valid = jnp.concatenate([targets < vocab, fresh])
  index = jnp.searchsorted(targets, jnp.where(inside, labels, 0)).astype(jnp.int32)
  return classes, class_valid, jnp.where(inside, index, 0)


def ctc_loss(logits: jax.Array, valid: jax.Array, labels: jax.Array, lengths: jax.Array,
             feasible: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed CTC negative log-likelihood, label tokens, infeasible rows), float32 scalars, over the
  `feasible` rows: logits float32[N, S, V + 1] (the blank is the last class, `Llasm.ctc_logits`),
  valid bool[N, S] (a row's frames need not be contiguous: padding frames anywhere are skipped,
  so the frames of a row's several audio slots align as one sequence), labels int[N, U], lengths
  int[N], feasible bool[N] (`ctc_feasible`). Infeasible rows are given no labels before the loss,
  so their (masked) loss and gradient stay finite."""
  u = labels.shape[1]
  n = jnp.where(feasible, lengths, 0)
  label_paddings = (jnp.arange(u)[None, :] >= n[:, None]).astype(jnp.float32)
  per_row = optax.ctc_loss(logits.astype(jnp.float32), 1.0 - valid.astype(jnp.float32), labels, label_paddings,
                           blank_id=logits.shape[-1] - 1)
  infeasible = jnp.sum((lengths > 0) & ~feasible).astype(jnp.float32)
  return jnp.sum(jnp.where(feasible, per_row, 0.0)), jnp.sum(n).astype(jnp.float32), infeasible


# ---------------------------------------------------------------------------------------------
# The loss policy: which loss config.train asks for, and what its batches must then carry.

# config.train.loss: cross-entropy on the reference answer, distillation from the frozen LLM
# reading the transcript as text (KL between next-token distributions on the answer tokens),
# (1 - kd_weight) * CE + kd_weight * KL, each a mean over the batch's answer tokens, or CTC alone:
# the adaptor's outputs scored against the LLM's embedding table and aligned to each row's
# transcript (no LLM pass at all: a cheap warm-up of the adaptor). config.train.ctc_weight > 0 adds
# ctc_weight * the CTC mean (per transcript token) to "ce", "kd" or "mix".
LOSSES = ("ce", "kd", "mix", "ctc")


def loss_options(train: Any) -> tuple[str, float, float]:
  """`config.train.{loss, kd_weight, kd_temperature}`, checked; absent keys: ("ce", 0.5, 1.0)."""
  loss = train.get("loss", "ce")
  weight, temperature = float(train.get("kd_weight", 0.5)), float(train.get("kd_temperature", 1.0))
  if loss not in LOSSES:
    raise UserError(f"config.train.loss {loss!r}: expected one of {', '.join(LOSSES)}")
  if loss == "mix" and not 0.0 <= weight <= 1.0:
    raise UserError(f"config.train.kd_weight {weight}: expected a share between 0 and 1 (loss = (1 - w) CE + w KL)")
  if loss in ("kd", "mix") and not temperature > 0:
    raise UserError(f"config.train.kd_temperature {temperature}: expected > 0 (1.0 = the plain distributions)")
  return loss, weight, temperature


def ctc_weight(train: Any) -> float:
  """`config.train.ctc_weight`, checked (absent: 0.0): the CTC mean's weight beside a "ce", "kd" or
  "mix" loss; loss "ctc" is CTC alone, whatever the weight."""
  weight = float(train.get("ctc_weight", 0.0))
  if not weight >= 0.0:
    raise UserError(f"config.train.ctc_weight {weight}: expected >= 0 (0 = no CTC term)")
  return weight


def needs_teacher(config: Any) -> bool:
  """Whether the batches of `config` carry the distillation teacher's text sequences."""
  return loss_options(config.get("train") or {})[0] in ("kd", "mix")


def needs_ctc(config: Any) -> bool:
  """Whether `config` trains with CTC (loss "ctc" or ctc_weight > 0): its batches then carry each
  row's transcript tokens, and its model the CTC blank (LlasmConfig.ctc)."""
  train = config.get("train") or {}
  return loss_options(train)[0] == "ctc" or ctc_weight(train) > 0
