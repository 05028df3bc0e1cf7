"""A training run's checkpoints (params, optimizer state, step and rng, data state) and the model folder it ends with."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from llasm_jax import checkpoint, paths
from llasm_jax.models.llasm import LlasmConfig
from llasm_jax.train.metrics import log
from llasm_jax.train.step import TrainState


class Checkpoints:
  """Orbax CheckpointManager over `workdir/checkpoints`: async, atomic, keeps the last K."""

  def __init__(self, workdir: str, config):
    self.dir = paths.join(workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.dir, item_names=("params", "opt_state", "train", "data"),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=config.train.checkpoint_every, max_to_keep=config.train.keep_checkpoints,
            enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
    """`step` is the host's count (reading `state.step` would wait for the device)."""
    if force and step in self.manager.all_steps():
      return False  # the interval save already took this step
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.merge_state(state.params, state.rest))),
        opt_state=ocp.args.StandardSave(jax.tree.leaves(state.opt_state)),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
    full = nnx.merge_state(abstract.params, abstract.rest)
    as_target = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    opt_leaves, opt_def = jax.tree.flatten(abstract.opt_state)
    got = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(as_target(nnx.to_pure_dict(full))),
        opt_state=ocp.args.StandardRestore(as_target(opt_leaves)),
        train=ocp.args.StandardRestore(as_target({"step": abstract.step, "rng": abstract.rng})),
        data=ocp.args.JsonRestore()))
    merged = nnx.merge_state(abstract.params, abstract.rest)
    nnx.replace_by_pure_dict(merged, got.params)
    new_params, new_rest = nnx.split_state(merged, nnx.Param, ...)
    state = TrainState(step=got.train["step"], params=new_params, rest=new_rest,
                       opt_state=jax.tree.unflatten(opt_def, list(got.opt_state)), rng=got.train["rng"])
    return state, got.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_model(folder: str, cfg: LlasmConfig, state: TrainState, config) -> None:
  """The trained model as a model folder (what `generate` and `export` read)."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.merge_state(state.params, state.rest)), sep="/")
  # The prompt format the batches had (synthetic batches have none): generate / chat / eval default to it.
  extra = {} if config.data.get("source") != "tfds" else {checkpoint.PROMPT_KEY: {
      "template": config.data.get("template", "llasm-cllama2"), "system": config.data.get("system")}}
  with checkpoint.atomic_dir(folder, overwrite=True) as tmp:
    checkpoint.save_params(tmp, "llasm", cfg, flat, stored_dtype=cfg.llm.param_dtype, extra=extra)
    init_from = config.train.get("init_from")
    if init_from:
      checkpoint.copy_companions(init_from, tmp)
  log(f"model written to {folder}")
