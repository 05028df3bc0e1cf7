"""Preemption of a training run: a SIGTERM asks every process to save the same step and stop."""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
  """SIGTERM (preemption, scancel, `launch/tpu.sh stop`) asks for a save at the current step.

  One process: a Python handler sets a flag, read after every step. Several processes: JAX's
  preemption sync manager (started by jax.distributed.initialize) catches the signal on any
  host, tells the others, and they agree on the next step to save at; asking it after every step
  costs no collective until a notice arrives, so a short grace period still saves whatever the
  logging interval. Without it (a distributed runtime that lacks one) the hosts compare flags
  with one tiny all-gather at logging intervals.
  """

  def __init__(self):
    self.requested = False
    self.synced = jax.process_count() > 1
    # With several processes the sync manager's own handler must see the signal: keep Python's out.
    self._old = {} if self.synced else {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,)}

  def _handle(self, signum, frame):
    self.requested = True

  def check(self, step: int, at_interval: bool) -> bool:
    """Whether to save `step` and stop; all processes get the same answer at the same step."""
    if jax.process_count() == 1:
      return self.requested
    if self.synced:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption sync manager in this runtime
        self.synced = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,)}
    if not at_interval:
      return False
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.max(flags))

  def restore_handlers(self) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)
