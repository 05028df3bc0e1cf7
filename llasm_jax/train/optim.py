"""Which parameters train (declared per stage in the config) and the optimizer over them.

`config.train.trainable` is a tuple of regexes over parameter paths ("adaptor/.*",
"llm/.*"); everything else is frozen. Frozen leaves go through `optax.set_to_zero` inside
`optax.multi_transform`, so they carry no optimizer state, and since nothing reads their
gradients XLA drops the work that would compute them. With `config.train.lora` on, the LoRA
factors are the LLM's only trainable leaves (`lora_labels`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from llasm_jax.layers.lora import LoraConfig, is_lora_path
from llasm_jax.models.llama import LORA_MODULES
from llasm_jax.errors import UserError

TRAIN, FROZEN = "train", "frozen"


def path_str(path) -> str:
  """A pytree key path as "llm/model/layers/layers/mlp/up_proj/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                  if not (hasattr(k, "name") and k.name == "value"))


def param_labels(params: Any, trainable: Sequence[str]) -> Any:
  """The pytree of `params` with each leaf replaced by "train" or "frozen"."""
  patterns = [re.compile(p) for p in trainable]
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: TRAIN if any(r.match(path_str(p)) for r in patterns) else FROZEN, params)
  if TRAIN not in jax.tree.leaves(labels):
    raise UserError(f"config.train.trainable {tuple(trainable)} matches no parameter; paths look like "
                     f"{path_str(jax.tree_util.tree_leaves_with_path(params)[0][0])!r}")
  return labels


def lora_config(train: Any) -> LoraConfig:
  """`config.train.lora` -> the LLM's LoraConfig: its target regexes resolved to the projections
  whose kernel paths ("llm/model/layers/layers/self_attn/q_proj/kernel") they match."""
  section = dict(train.get("lora") or {})
  rank = int(section.get("rank", 0))
  if not rank:
    return LoraConfig()
  targets = []
  for pattern in section.get("targets", ()):
    hits = [name for name, path in LORA_MODULES.items() if re.match(pattern, f"llm/{path}/kernel")]
    if not hits:
      raise UserError(f"config.train.lora.targets {pattern!r} matches no LLM projection; kernel paths look like "
                       f"'llm/{LORA_MODULES['q_proj']}/kernel', of {', '.join(LORA_MODULES)}")
    targets += hits
  return LoraConfig(rank=rank, alpha=float(section.get("alpha", 16.0)), dropout=float(section.get("dropout", 0.0)),
                    targets=tuple(n for n in LORA_MODULES if n in targets))


def lora_labels(labels: Any) -> Any:
  """`labels` with LoRA on: of the LLM only the LoRA factors train (the other "llm/" leaves are
  frozen, so they carry no optimizer state); labels outside the LLM stay as they are."""
  def label(path, lab):
    p = path_str(path)
    if not p.startswith("llm/"):
      return lab
    return TRAIN if is_lora_path(p) else FROZEN

  return jax.tree_util.tree_map_with_path(label, labels)


def learning_rate(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `cfg.lr`, then cosine decay to `cfg.lr * cfg.end_lr_ratio`."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.lr * cfg.end_lr_ratio)


def _decay_mask(params):
  # Weight decay on matrices only, not on norms, biases or 1-d scales.
  return jax.tree.map(lambda x: x.ndim >= 2 and x.shape[-1] > 1 and x.shape[-2] > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, labels: Any, total_steps: int) -> optax.GradientTransformation:
  """AdamW + global-norm clipping on trainable leaves; non-finite updates are skipped."""
  trainable = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask),
  )
  tx = optax.multi_transform({TRAIN: trainable, FROZEN: optax.set_to_zero()}, labels)
  # A step with a NaN/inf update leaves params and moments untouched and is counted.
  return optax.apply_if_finite(tx, max_consecutive_errors=cfg.max_consecutive_nonfinite)


def keep_new_rows(grads: Any, first_new_row: int) -> Any:
  """Zeroes the embedding / LM-head gradient rows below `first_new_row`, so of those
  matrices only the rows of the appended audio tokens train."""
  def mask(path, g):
    p = path_str(path)
    if p.endswith("embed_tokens/embedding"):
      return jnp.where((jnp.arange(g.shape[0]) >= first_new_row)[:, None], g, 0)
    if p.endswith("lm_head/kernel"):
      return jnp.where((jnp.arange(g.shape[1]) >= first_new_row)[None, :], g, 0)
    return g
  return jax.tree_util.tree_map_with_path(mask, grads)
