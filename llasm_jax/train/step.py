"""The pure train step: `train_step(state, batch) -> (state, metrics)`, jitted once by the trainer.

Batch (global arrays, B = global batch, G = gradient-accumulation microbatches):
  input_ids int32[B, T], labels int32[B, T] (-100: no loss; HF convention, shifted here),
  attention_mask int32[B, T], positions int32[B, T], target_positions int32[B, K] (the positions
  whose next token is a target, -1 padded: the LM head runs there only), and the audio as
  mel float32[B, A, M, F], mel_lengths int32[B, A] (Whisper runs in the step), or as cached
  Whisper outputs audio_features float32|bfloat16[B, A, S, E], audio_feature_lengths int32[B, A]
  (from `llasm-jax data encode`: the step runs the adaptor and the LLM only).
With config.data.shared_prefix also prefix_ids int32[P], the fixed opening every row starts with
  (the rows hold what follows it): the LLM runs it once, at batch 1, and every row attends to its
  keys and values. Exact, and gradients flow through it as through the rows (stage 2 too).
With config.data.packing also segment_ids int32[B, T] (1..n per sample of a row, 0 = padding):
  attention stays inside each sample and the positions restart, so every target's loss is the
  one it has alone in a row.
With a distilling loss ("kd", "mix") also the teacher's text sequences: teacher_input_ids,
  teacher_attention_mask, teacher_positions int32[B, Tt] and teacher_target_positions int32[B, K]
  (slot i predicts the same answer token as slot i of target_positions; -1 = none).
With CTC (loss "ctc" or ctc_weight > 0) also each row's transcript in the LLM's tokens:
  ctc_labels int32[B, U], ctc_label_lengths int32[B] (0 = no known text; a length past U: cut,
  and too long to align). A row's audio slots align as one sequence of frames (an audio longer
  than a window spans several slots; several audios speak their transcripts in order).
The loss is the mean over target tokens of the whole global batch, accumulation included:
  "ce":  CE summed over target slots / their count;
  "kd":  KL(teacher || student) summed over slots where both exist / their count;
  "mix": (1 - w) * the "ce" mean + w * the "kd" mean;
  "ctc": CTC summed over the rows it can align / their transcript tokens; the adaptor's outputs
         scored against the LLM's embedding table (`Llasm.ctc_logits`), and no LLM pass at all;
         with ctc_negatives > 0 against the batch's transcript tokens and that many random others
         only (a sampled softmax, `losses.ctc_classes`);
  and with ctc_weight > 0, "ce" / "kd" / "mix" + ctc_weight * the "ctc" mean.
The teacher is the frozen LLM reading the transcripts as text (no audio), in the same step and
on the same weights as the student (stage 1: the LLM is frozen, so both passes share it).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llasm_jax.layers import dropout_rng
from llasm_jax.models.llasm import splice
from llasm_jax.train import losses
from llasm_jax.train.optim import TRAIN, keep_new_rows, path_str
from llasm_jax.errors import UserError

# The batch entry that train_step adds: uint32[B, 2], one dropout key per row (see train_step).
DROPOUT_KEY = "dropout_rng"
# The batch entry that train_step adds with CTC: bool[B], the rows whose transcript their frames can align.
CTC_FEASIBLE = "ctc_feasible"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Any  # nnx.State of the model's Params (float32 master weights)
  rest: Any  # nnx.State of the other variables (Whisper's fixed positions)
  opt_state: Any
  rng: jax.Array  # uint32[2]: the run's key; step s draws its dropout (LoRA's) from fold_in(rng, s)


def microbatches(batch: dict[str, jax.Array], grad_accum: int) -> dict[str, jax.Array]:
  """[B, ...] -> [G, B // G, ...], microbatch g holding rows g, G + g, 2G + g, ... (strided, as
  MaxText splits): the batch is sharded over data x fsdp in contiguous blocks of rows, so every
  microbatch keeps rows on every shard and the split moves no data between devices; contiguous
  microbatches would each live on 1/G of the devices and be resharded inside the loop."""
  return {k: v.reshape(v.shape[0] // grad_accum, grad_accum, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def audio_frames(cfg, batch: dict[str, jax.Array]) -> jax.Array:
  """int32[B]: the adaptor frames of each row's audio slots together, by the model config's own
  rule (`LlasmConfig.audio_tokens`, as `contract.check_batch` asks it): from the mel lengths, or
  from cached encoder frames S (which 2S mel frames give)."""
  mel = 2 * batch["audio_feature_lengths"] if "audio_features" in batch else batch["mel_lengths"]
  tokens = jnp.where(mel > 0, cfg.audio_tokens(jnp.maximum(mel, 1)), 0)
  return jnp.sum(tokens, axis=1).astype(jnp.int32)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, labels: Any, *, grad_accum: int,
                    first_new_row: int | None = None, loss: str = "ce", kd_weight: float = 0.5,
                    kd_temperature: float = 1.0, loss_chunk: int = 0, ctc_weight: float = 0.0,
                    ctc_negatives: int = 0):
  """Builds the step function. `labels` marks leaves "train"/"frozen"; with `first_new_row`
  the embedding rows below it stay frozen. `loss`, `kd_weight`, `kd_temperature`, `loss_chunk`,
  `ctc_weight`, `ctc_negatives`: as config.train (see the module docstring); "kd"/"mix" need the batch's teacher
  keys, CTC its ctc keys and a model with the CTC blank (LlasmConfig.ctc).

  Gradients are taken with respect to the trainable leaves only. Differentiating all of them
  and dropping the frozen ones is not enough: XLA does not prune the unused weight gradients
  out of the scanned backward loop, and for a frozen 7B LLM on fsdp=8 they cost 27 GiB per
  device (measured with `train --compile-only`), against 7 GiB for the same step in stage 2.
  """
  trainable = [lab == TRAIN for lab in jax.tree.leaves(labels)]
  if loss not in losses.LOSSES:
    raise UserError(f"config.train.loss {loss!r}: expected one of {', '.join(losses.LOSSES)}")
  if loss_chunk < 0:
    raise UserError(f"config.train.loss_chunk {loss_chunk}: expected target positions per chunk, or 0 for all at once")
  if not ctc_weight >= 0:
    raise UserError(f"config.train.ctc_weight {ctc_weight}: expected >= 0 (0 = no CTC term)")
  if ctc_negatives < 0:
    raise UserError(f"config.train.ctc_negatives {ctc_negatives}: expected >= 0 (0 = the whole vocab)")
  distil = loss in ("kd", "mix")
  # Fixed at trace time: loss "ctc" traces no LLM at all, and ctc_weight 0 traces no CTC.
  ctc_only = loss == "ctc"
  use_ctc = ctc_only or ctc_weight > 0
  if distil:
    llm = [path_str(p) for p, lab in jax.tree_util.tree_leaves_with_path(labels)
           if lab == TRAIN and path_str(p).startswith("llm/")]
    if llm:
      raise UserError(f"config.train.loss={loss!r} distils from the frozen LLM, but config.train.trainable trains "
                       f"{len(llm)} LLM parameters (e.g. {llm[0]!r}), as stage 2 does; use loss 'ce' there, or "
                       "train only the adaptor (stage 1)")

  def split(params):
    leaves = jax.tree.leaves(params)
    return [x for x, t in zip(leaves, trainable) if t], [x for x, t in zip(leaves, trainable) if not t]

  def join(treedef, train, frozen):
    train, frozen = iter(train), iter(frozen)
    return jax.tree.unflatten(treedef, [next(train) if t else next(frozen) for t in trainable])

  def audio_embeddings(model, batch):
    """The adaptor's raw outputs float[B, A, P, D] (what CTC scores) and their validity bool[B, A, P]."""
    if "audio_features" in batch:  # which audio input is fixed by the batch's keys at trace time
      return model.adapt(batch["audio_features"], batch["audio_feature_lengths"], raw=True)
    return model.embed_audio(batch["mel"], batch["mel_lengths"], raw=True)

  def ctc_terms(model, embeds, valid, batch):
    """(summed CTC, its label tokens, infeasible rows): a row's A slots align as one sequence."""
    b = valid.shape[0]
    labels, lengths = batch["ctc_labels"], batch["ctc_label_lengths"]
    classes = class_valid = None
    if ctc_negatives:  # a sampled softmax: the batch's tokens and ctc_negatives others
      key = jax.random.fold_in(jax.random.wrap_key_data(batch[DROPOUT_KEY][0]), 1)
      classes, class_valid, labels = losses.ctc_classes(labels, lengths, key, ctc_negatives, model.cfg.llm.vocab_size)
    logits = model.ctc_logits(embeds.reshape(b, -1, embeds.shape[-1]), classes, class_valid)
    return losses.ctc_loss(logits, valid.reshape(b, -1), labels, lengths, batch[CTC_FEASIBLE])

  def summed_loss(train_leaves, frozen_leaves, treedef, rest, batch, kd_scale, ctc_scale):
    """-> (what is differentiated, {summed CE, target count, summed KL, summed CTC, infeasible
    rows}); see train_step for kd_scale and ctc_scale."""
    params = join(treedef, train_leaves, jax.lax.stop_gradient(frozen_leaves))
    model = nnx.merge(graphdef, params, rest)
    zero = jnp.zeros((), jnp.float32)
    if ctc_only:
      ctc, _, infeasible = ctc_terms(model, *audio_embeddings(model, batch), batch)
      return ctc, dict(ce=zero, tokens=zero, kl=zero, ctc=ctc, ctc_infeasible=infeasible)
    if "audio_features" in batch:  # which audio input is fixed by the batch's keys at trace time
      audio = dict(audio_features=batch["audio_features"], audio_feature_lengths=batch["audio_feature_lengths"])
    else:
      audio = dict(mel=batch["mel"], mel_lengths=batch["mel_lengths"])
    prefix_kv = None
    if "prefix_ids" in batch:  # the template's opening, shared by every row: run once, its keys and values reused
      prefix = batch["prefix_ids"][None]
      _, cache = model.llm(prefix, cache=model.llm.init_cache(1, prefix.shape[1]), return_hidden=True)
      prefix_kv = (cache.k, cache.v)
    ctc = infeasible = zero
    if use_ctc:  # the audio embeddings once, for both the LLM (what `Llasm.__call__` does) and CTC
      embeds, valid = audio_embeddings(model, batch)
      ctc, _, infeasible = ctc_terms(model, embeds, valid, batch)
      if model.cfg.soft_tokens:
        embeds = model.soft_tokens(embeds, valid)
      inputs = splice(model.llm.embed(batch["input_ids"]), batch["input_ids"], embeds, valid, model.cfg.audio_patch_id)
      hidden, _ = model.llm(inputs_embeds=inputs, attention_mask=batch["attention_mask"],
                            positions=batch["positions"], prefix_kv=prefix_kv, segment_ids=batch.get("segment_ids"),
                            return_hidden=True)
    else:
      hidden, _ = model(batch["input_ids"], **audio, attention_mask=batch["attention_mask"],
                        positions=batch["positions"], prefix_kv=prefix_kv, segment_ids=batch.get("segment_ids"),
                        return_hidden=True)
    # The LM head and softmax on the K target slots only, not all T positions.
    slots = batch["target_positions"]
    valid = slots >= 0
    slots = jnp.maximum(slots, 0)
    targets = jnp.take_along_axis(batch["labels"], jnp.minimum(slots + 1, batch["labels"].shape[1] - 1), axis=1)
    teacher = both = None
    if distil:
      # The teacher: the same LLM reading the transcript as text, on the same target slots.
      t_slots = batch["teacher_target_positions"]
      both = valid & (t_slots >= 0)
      t_hidden, _ = model.llm(batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                              positions=batch["teacher_positions"], return_hidden=True)
      teacher = losses.gather(jax.lax.stop_gradient(t_hidden), jnp.maximum(t_slots, 0))
    # loss_chunk slots at a time, recomputed in the backward pass: no float32[B, K, V] logits.
    ce, count, kl = losses.token_losses(model.llm.logits, losses.gather(hidden, slots), jnp.where(valid, targets, 0),
                                        valid, teacher=teacher, both=both, temperature=kd_temperature,
                                        chunk=loss_chunk)
    aux = dict(ce=ce, tokens=count, kl=jnp.zeros(()) if not distil else kl, ctc=ctc, ctc_infeasible=infeasible)
    if not distil:
      main = ce
    elif loss == "kd":
      main = kl
    else:
      main = (1.0 - kd_weight) * ce + kd_weight * kd_scale * kl
    if use_ctc:
      main = main + ctc_weight * ctc_scale * ctc
    return main, aux

  def dropout_loss(train_leaves, frozen_leaves, treedef, rest, batch, kd_scale, ctc_scale):
    # Dropout draws from the key of the (micro)batch's first row; models without dropout ignore it.
    with dropout_rng(jax.random.wrap_key_data(batch[DROPOUT_KEY][0])):
      return summed_loss(train_leaves, frozen_leaves, treedef, rest, batch, kd_scale, ctc_scale)

  value_and_grad = jax.value_and_grad(dropout_loss, has_aux=True)


  def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    treedef = jax.tree.structure(state.params)
    train, frozen = split(state.params)
    # One dropout key per row, so that the keys split with the rows and every microbatch draws its
    # own; from the run's key and the step, so that a resumed run draws what a straight one did.
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = {**batch, DROPOUT_KEY: jax.random.key_data(jax.random.split(step_key, batch["input_ids"].shape[0]))}
    # Token counts of the whole global batch, known before any microbatch runs: "mix" weighs the
    # KL sum by n_ce / n_kd, so that one division by n_ce gives (1 - w) CE mean + w KL mean.
    n_ce = jnp.sum(batch["target_positions"] >= 0).astype(jnp.float32)
    n_kd = jnp.zeros(())
    if distil:
      n_kd = jnp.sum((batch["target_positions"] >= 0) & (batch["teacher_target_positions"] >= 0)).astype(jnp.float32)
    kd_scale = jnp.maximum(n_ce, 1.0) / jnp.maximum(n_kd, 1.0)
    # Likewise CTC: which rows can align (their frames, the owner's count: `LlasmConfig.audio_tokens`)
    # and their label tokens n_ctc are known up front; the CTC sum weighed by n_main / n_ctc makes one
    # division by n_main give the main mean + ctc_weight * the CTC mean.
    n_ctc = jnp.zeros(())
    if use_ctc:
      frames = audio_frames(nnx.merge(graphdef, state.params, state.rest).cfg, batch)  # no work: a config
      feasible = losses.ctc_feasible(batch["ctc_labels"], batch["ctc_label_lengths"], frames)
      batch = {**batch, CTC_FEASIBLE: feasible}
      n_ctc = jnp.sum(jnp.where(feasible, batch["ctc_label_lengths"], 0)).astype(jnp.float32)
    n_main = n_ctc if ctc_only else n_kd if loss == "kd" else n_ce
    ctc_scale = jnp.maximum(n_main, 1.0) / jnp.maximum(n_ctc, 1.0)
    if grad_accum == 1:
      (objective, aux), train_grads = value_and_grad(train, frozen, treedef, state.rest, batch, kd_scale, ctc_scale)
    else:
      shared = {k: v for k, v in batch.items() if k == "prefix_ids"}  # one for all rows: not split
      micro = microbatches({k: v for k, v in batch.items() if k not in shared}, grad_accum)

      def accumulate(carry, mb):
        (o, a), g = value_and_grad(train, frozen, treedef, state.rest, {**mb, **shared}, kd_scale, ctc_scale)
        return jax.tree.map(jnp.add, carry, (o, a, g)), None

      zeros = (jnp.zeros(()), {k: jnp.zeros(()) for k in ("ce", "tokens", "kl", "ctc", "ctc_infeasible")},
               [jnp.zeros_like(x) for x in train])
      (objective, aux, train_grads), _ = jax.lax.scan(accumulate, zeros, micro)
    ce, tokens, kl = aux["ce"], aux["tokens"], aux["kl"]
    denom = jnp.maximum(n_ctc if ctc_only else n_kd if loss == "kd" else tokens, 1.0)
    # Frozen leaves get zeros that nothing reads (set_to_zero): XLA drops them.
    grads = join(treedef, [g / denom for g in train_grads], [jnp.zeros_like(x) for x in frozen])
    if first_new_row is not None:
      grads = keep_new_rows(grads, first_new_row)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if first_new_row is not None:  # weight decay (and momentum) move rows a zero gradient does not
      updates = keep_new_rows(updates, first_new_row)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": objective / denom,
        "ce": ce / jnp.maximum(tokens, 1.0),
        "target_tokens": n_ctc if ctc_only else tokens,  # the tokens this loss has targets on
        "grad_norm": optax.tree.norm([g for g, t in zip(jax.tree.leaves(grads), trainable) if t]),
        "nonfinite_steps": opt_state.total_notfinite,
        "update_applied": opt_state.last_finite,
    }
    if distil:
      metrics.update(kd=kl / jnp.maximum(n_kd, 1.0), kd_tokens=n_kd)
    if ctc_only:
      del metrics["ce"]  # no LLM pass, no CE
    if use_ctc:
      metrics.update(ctc=aux["ctc"] / jnp.maximum(n_ctc, 1.0), ctc_tokens=n_ctc,
                     ctc_infeasible=aux["ctc_infeasible"],
                     ctc_rows=jnp.sum(batch["ctc_label_lengths"] > 0).astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
