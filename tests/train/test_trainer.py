"""The training loop closes what it opened whatever stops a run, an error that is no ValueError included."""

import signal

import pytest

from llasm_jax.train import trainer
from llasm_jax.train.checkpoints import Checkpoints
from llasm_jax.train.metrics import Metrics
from llasm_jax.train.setup import Setup
from tests.train.test_train import tiny_config


class WatchedData:
  """The run's data iterator with a close() that says it was called (grain's stops its workers)."""

  def __init__(self, it, closed: list):
    self.it, self.closed = it, closed

  def __next__(self):
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)

  def close(self):
    self.closed.append("data")
    getattr(self.it, "close", lambda: None)()


def watch_closing(monkeypatch, *classes) -> list[str]:
  """The names of what the run closes, in order: instances of `classes`, and its data iterator."""
  closed = []
  for cls in classes:
    def close(self, real=cls.close, name=cls.__name__):
      closed.append(name)
      real(self)

    monkeypatch.setattr(cls, "close", close)
  make_data = trainer.make_data

  def watched_data(config, cfg):
    it, host_batch = make_data(config, cfg)
    return WatchedData(it, closed), host_batch

  monkeypatch.setattr(trainer, "make_data", watched_data)
  return closed


def test_a_runtime_error_mid_run_closes_everything_it_opened(tmp_path, monkeypatch):
  closed, handlers = watch_closing(monkeypatch, Checkpoints, Metrics), []
  compile_step = Setup.compile

  def compile_failing(self, batch):  # the second step fails as a lost device would
    step, calls = compile_step(self, batch), []

    def run(state, batch):
      calls.append(1)
      handlers.append(signal.getsignal(signal.SIGTERM))
      if len(calls) == 2:
        raise RuntimeError("device lost")
      return step(state, batch)

    return run

  monkeypatch.setattr(Setup, "compile", compile_failing)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(RuntimeError, match="device lost"):
    trainer.train(tiny_config(steps=4), str(tmp_path))
  assert len(handlers) == 2 and handlers[0] is not before  # the preemption handler was on during the steps
  assert signal.getsignal(signal.SIGTERM) is before  # and is off again
  assert sorted(closed) == ["Checkpoints", "Metrics", "data"]  # each closed once


def test_a_runtime_error_before_the_first_step_closes_the_checkpoints_and_the_data(tmp_path, monkeypatch):
  """Initial parameters that fail (out of device memory, say) after the checkpoint manager and the
  data iterator opened: both close, and nothing else was opened yet."""
  closed = watch_closing(monkeypatch, Checkpoints, Metrics)

  def initial_params(*args, **kw):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

  monkeypatch.setattr(trainer, "initial_params", initial_params)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(RuntimeError, match="out of memory"):
    trainer.train(tiny_config(steps=2), str(tmp_path))
  assert sorted(closed) == ["Checkpoints", "data"]
  assert signal.getsignal(signal.SIGTERM) is before
