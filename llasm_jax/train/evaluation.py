"""Evaluation during training (`config.eval`): greedy answers of the current parameters on a held-out set, scored."""

from __future__ import annotations

import dataclasses
import time

import jax
from flax import nnx

from llasm_jax import paths, tokens
from llasm_jax.data import features, pipeline
from llasm_jax.errors import UserError
from llasm_jax.infer.evaluate import LlasmAnswers, read_rows, run
from llasm_jax.infer.scoring import Report
from llasm_jax.train.metrics import Metrics, log
from llasm_jax.train.setup import Setup
from llasm_jax.train.step import TrainState


class TrainingEval:
  """`config.eval` of a training run: greedy answers of the current parameters on a held-out
  dataset, scored. The parameters stay where training keeps them (no save or reload): the first
  call builds an engine on the training mesh, later calls hand it the new values, which compile
  nothing again (same shapes and shardings). Prompts use the training data's template, system
  prompt (`config.data.system`) and windows."""

  def __init__(self, config, cfg, mesh, rules):
    ev = config.eval
    self.every = int(ev.get("every", 0))
    if not ev.get("data"):
      raise UserError("config.eval.every is set but config.eval.data is empty; set it to a held-out dataset "
                       "of `llasm-jax data build`")
    tokenizer = config.data.get("tokenizer") or config.train.get("init_from")
    if not tokenizer:
      raise UserError("config.eval needs a tokenizer: set config.data.tokenizer or config.train.init_from "
                       "(a model folder)")
    self.source = pipeline.Source(ev.data)
    self.rows = read_rows(self.source, ev.get("limit"))
    if not self.rows:
      raise UserError(f"config.eval.data {ev.data!r} holds no rows")
    self.tokenizer_dir, self.tokenizer = tokenizer, tokens.load_tokenizer(tokenizer)
    self.cfg, self.mesh, self.rules = cfg, mesh, rules
    self.batch, self.max_new_tokens = int(ev.get("batch", 8)), int(ev.get("max_new_tokens", 64))
    self.template = config.data.get("template", "llasm-cllama2")
    self.system = config.data.get("system")
    self.mel_frames = int(config.data.get("mel_frames", features.MAX_FRAMES))
    self.answers: LlasmAnswers | None = None

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def __call__(self, model, step: int) -> Report:
    """Evaluates `model` (a Llasm holding the training state's arrays) at training step `step`."""
    from llasm_jax.infer.engine import Engine
    from llasm_jax.infer.generator import Generator, checkpoint_eos_ids

    if self.answers is None:
      tok = self.tokenizer
      engine = Engine(model, mesh=self.mesh, rules=self.rules,
                      eos_ids=checkpoint_eos_ids(self.tokenizer_dir, self.cfg.llm, tok),
                      pad_id=tok.pad_token_id)
      generator = Generator(engine, tok, template=self.template, system=self.system, folder=self.tokenizer_dir)
      self.answers = LlasmAnswers.for_source(generator, self.source, template=self.template, system=self.system,
                                             mel_frames=self.mel_frames, max_new_tokens=self.max_new_tokens)
    else:
      self.answers.generator.engine.update_params(model)
      self.answers.timings.clear()
    rows = [dataclasses.replace(r, hypothesis="") for r in self.rows]
    return run(rows, self.answers, batch=self.batch, info={"step": step, "data": self.source.paths})


def make_evaluator(config, setup: Setup):
  """The `config.eval` evaluator, or None: `config.eval.every` 0 (default)."""
  ev = config.get("eval")
  if not ev or not ev.get("every"):
    return None
  return TrainingEval(config, setup.cfg, setup.mesh, setup.rules)


def run_eval(evaluator, setup: Setup, state: TrainState, step: int, metrics: Metrics, workdir: str) -> dict:
  """Greedy answers of the current parameters (the arrays of `state`, where they are), scored:
  one log line, TensorBoard eval/wer|cer|f1, and workdir/eval/step_<step>.json."""
  t0 = time.perf_counter()
  report = evaluator(nnx.merge(setup.graphdef, state.params, state.rest), step)
  log(f"eval step {step:>6} | {report.summary()}")
  if metrics.writer is not None:
    for k in ("wer", "cer", "f1"):
      if k in report.totals:
        metrics.writer.add_scalar(f"eval/{k}", report.totals[k], step)
    metrics.writer.flush()
  if jax.process_index() == 0:
    report.write(paths.join(workdir, "eval", f"step_{step}.json"))
  metrics.t0 += time.perf_counter() - t0  # evaluating is not training time
  return {"step": step, **report.totals}
