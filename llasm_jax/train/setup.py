"""What a training run follows from its config: the model config, the jitted step and its shardings
(`prepare`, nothing allocated), the initial parameters and the data iterator."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from llasm_jax import checkpoint, sharding
from llasm_jax.config import llasm_config
from llasm_jax.data import contract, encode
from llasm_jax.data.cache import check_cache
from llasm_jax.errors import UserError
from llasm_jax.layers.lora import is_lora_path
from llasm_jax.models.llasm import CtcBlank, Llasm, LlasmConfig
from llasm_jax.train.losses import ctc_weight, loss_options, needs_ctc, needs_teacher
from llasm_jax.train.metrics import log
from llasm_jax.train import data_config
from llasm_jax.train.optim import FROZEN, lora_config, lora_labels, make_optimizer, param_labels, path_str
from llasm_jax.train.step import TrainState, make_train_step


@dataclasses.dataclass
class Setup:
  """Everything about a run that follows from its config alone (nothing allocated)."""

  cfg: LlasmConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: Any
  labels: Any
  tx: optax.GradientTransformation
  state_sharding: TrainState
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  batch_sharding: dict[str, jax.sharding.NamedSharding]
  step: Any  # the jitted train step
  features: str = "mel"  # the batches' audio: "mel", or "cached" Whisper outputs (no Whisper in the step)
  cache: dict | None = None  # the cached dataset's marker (what made its features)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def compile(self, batch):
    # The rules and mesh must be active while tracing: `constrain` reads them then.
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      return self.step.lower(self.abstract_state, batch).compile()


RUN_OPTIONS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl", "vocab_multiple")


def model_config(config: ml_collections.ConfigDict) -> LlasmConfig:
  """From `config.model`, or from the model folder / stage-1 workdir in `config.train.init_from`
  (its architecture wins; `config.model.llm`/`audio` still set run options such as dtype), with
  the LLM's LoRA from `config.train.lora`, and the CTC blank when config.train trains with CTC
  (a folder without one gets a fresh one: `initial_params`)."""
  init_from = config.train.get("init_from")
  lora = lora_config(config.train)
  if not init_from:
    cfg = llasm_config(config.model)
    return cfg.replace(llm=cfg.llm.replace(lora=lora), ctc=cfg.ctc or needs_ctc(config) or cfg.soft_tokens)
  meta = checkpoint.read_meta(init_from)
  if meta["kind"] != "llasm":
    raise UserError(f"config.train.init_from {init_from!r} holds a {meta['kind']!r} model; training needs a "
                     "LLaSM model: `llasm-jax convert --llm LLM --whisper WHISPER --out DIR`")
  cfg = checkpoint.config_from_dict("llasm", meta["config"])

  def run_options(part: str) -> dict:
    return {k: v for k, v in config.model.get(part, {}).items() if k in RUN_OPTIONS}

  # config.model.soft_tokens turns LegoSLM's input on for a folder trained without it (a CTC warm phase).
  soft = cfg.soft_tokens or bool(config.model.get("soft_tokens", False))
  return cfg.replace(llm=cfg.llm.replace(lora=lora, **run_options("llm")),
                     audio=cfg.audio.replace(**run_options("audio")), ctc=cfg.ctc or needs_ctc(config) or soft,
                     soft_tokens=soft)


def prepare(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """`devices`: the mesh's devices, default all of this job's (a TPU topology's for `--compile-only`)."""
  cfg = model_config(config)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  tc = config.train
  if tc.batch_size % (tc.grad_accum * mesh.shape["data"] * mesh.shape["fsdp"]):
    raise UserError(f"config.train.batch_size {tc.batch_size} must divide by grad_accum ({tc.grad_accum}) x "
                     f"data x fsdp ({mesh.shape['data'] * mesh.shape['fsdp']})")
  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(lambda: Llasm(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
  # The CTC blank trains whenever CTC does (it is part of the CTC loss, not of the model's answers).
  labels = param_labels(abs_params, tuple(tc.trainable) + (("ctc_blank/.*",) if needs_ctc(config) or cfg.soft_tokens
                                                           else ()))
  if cfg.llm.lora.rank:
    labels = lora_labels(labels)
  tx = make_optimizer(config.optim, labels, tc.steps)
  param_sh = sharding.state_shardings(abs_params, mesh, rules)
  rest_sh = sharding.state_shardings(abs_rest, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abs_opt = jax.eval_shape(tx.init, abs_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
  state_sh = TrainState(step=replicated, params=param_sh, rest=rest_sh, opt_state=opt_sh, rng=replicated)
  abs_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params, rest=abs_rest,
                         opt_state=abs_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  # The shardings tree is a prefix of the state (optax's MaskedNode subtrees hold no arrays).
  abs_state = jax.tree.map(
      lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub),
      state_sh, abs_state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  first_new_row = None
  if tc.get("new_token_rows_only"):
    first_new_row = min(cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id)
  loss, kd_weight, kd_temperature = loss_options(tc)
  step_fn = make_train_step(graphdef, tx, labels, grad_accum=tc.grad_accum, first_new_row=first_new_row,
                            loss=loss, kd_weight=kd_weight, kd_temperature=kd_temperature,
                            loss_chunk=int(tc.get("loss_chunk", 0)), ctc_weight=ctc_weight(tc),
                            ctc_negatives=int(tc.get("ctc_negatives", 0)))
  features, cache = data_config.data_features(config)
  batch_sh = {k: jax.sharding.NamedSharding(mesh, sharding.logical_spec(contract.BATCH_AXES[k], rules))
              for k in contract.batch_keys(features, teacher=needs_teacher(config),
                                           prefix=bool(config.data.get("shared_prefix", False)),
                                           packed=bool(config.data.get("packing", False)), ctc=needs_ctc(config))}
  jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))
  return Setup(cfg, mesh, rules, graphdef, labels, tx, state_sh, abs_state, batch_sh, jitted, features, cache)


def trains_llm(setup: Setup) -> bool:
  """Whether any LLM weight trains (stage 2): its weight gradients count in the step's FLOPs.
  LoRA factors do not count: with them alone no gradient of the LLM's matrices is computed, and
  theirs (rank r) cost next to nothing."""
  return any(lab != FROZEN for lab, (path, _) in zip(jax.tree.leaves(setup.labels),
                                                      jax.tree_util.tree_leaves_with_path(setup.abstract_state.params))
             if path_str(path).startswith("llm/") and not is_lora_path(path_str(path)))


def initial_params(config, cfg: LlasmConfig, mesh, rules, param_sharding, rest_sharding):
  """(params, rest) as global arrays in their shardings: random, or from `init_from`."""
  init_from = config.train.get("init_from")
  if not init_from:
    def init():
      _, params, rest = nnx.split(Llasm(cfg, rngs=nnx.Rngs(config.train.seed)), nnx.Param, ...)
      return params, rest

    with jax.set_mesh(mesh):
      return jax.jit(init, out_shardings=(param_sharding, rest_sharding))()
  # New LoRA factors (a base model adapted in stage 2) start as the random init above would.
  stored = checkpoint.read_meta(init_from)["config"]
  stored_ctc, stored_soft = bool(stored.get("ctc", False)), bool(stored.get("soft_tokens", False))
  model, _ = checkpoint.load_model(init_from, mesh=mesh, rules=rules, seed=config.train.seed,
                                   cfg=cfg.replace(ctc=cfg.ctc and stored_ctc, soft_tokens=cfg.soft_tokens and stored_soft))
  if cfg.ctc and not stored_ctc:  # CTC on a folder without the blank (e.g. a fresh `convert`): a new one
    model.ctc_blank = CtcBlank(cfg.llm.hidden_size, cfg.llm.vocab_size, param_dtype=cfg.llm.param_dtype,
                               soft_tokens=cfg.soft_tokens)
    log(f"added a new CTC blank (ctc_blank/) to the model of {init_from}")
  elif cfg.soft_tokens and not stored_soft:  # LegoSLM's input on a CTC-trained folder: the blank's embedding
    model.ctc_blank.add_embedding()
    log(f"added a blank embedding (ctc_blank/embedding) to the model of {init_from}: the LLM reads soft tokens")
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, param_sharding)
  log(f"initialised from {init_from}")
  return params, rest


def make_data(config, cfg: LlasmConfig):
  """The host's data iterator (grain, with get_state/set_state) and the per-host batch size."""
  global_batch = config.train.batch_size
  if global_batch % jax.process_count():
    raise UserError(f"config.train.batch_size {global_batch} does not divide over {jax.process_count()} processes")
  host_batch = global_batch // jax.process_count()
  source = config.data.source
  if source == "synthetic" and config.data.get("packing"):
    raise UserError("config.data.packing packs the samples of config.data.source='tfds'; the synthetic batches "
                     "come as whole rows: set config.data.packing=False")
  if source == "synthetic" and needs_ctc(config):
    raise UserError("config.train CTC (loss 'ctc' or ctc_weight > 0) aligns the audio to its transcript, which "
                     "synthetic batches lack: set config.data.source='tfds' with built datasets")
  if source == "synthetic":
    from llasm_jax.train.synthetic import synthetic_dataset

    ds = synthetic_dataset(cfg, config.data, seed=config.data.seed, host_batch=host_batch,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           teacher=needs_teacher(config))
    return iter(ds), host_batch
  return data_config.train_iterator(config, cfg, host_batch=host_batch), host_batch


def check_cached_features(config, setup: Setup, state: TrainState) -> None:
  """Cached features must be what this model's own Whisper would compute: same mode, sizes,
  windows (checked when the data opened) and the same Whisper weights (checked here)."""
  params = nnx.to_pure_dict(nnx.merge_state(state.params, state.rest))
  check_cache(setup.cache, setup.cfg, mel_frames=config.data.get("mel_frames", 3000),
                       whisper_fingerprint=encode.speech_fingerprint(params),
                       where=f"config.data.dir {config.data.dir!r}")
