"""The serving loop: requests wait in a bounded queue, a thread moves them into free decode slots
and steps every slot together (continuous batching over one `SlotEngine`).

    scheduler = Scheduler(generator, slots=8, max_len=2048)
    scheduler.start()
    job = scheduler.submit(prompt_ids, mels, max_new_tokens=64, sampling=..., stop=["\\n\\n"])
    async for event in job.events(): ...      # Delta(text, tokens) ..., then Finished(reason, usage)
    job.cancel()                              # a client that left: its slot is freed at the next step

The thread owns the device: it alone calls the engine. Between two decode calls it ends the
rows that stopped (EOS, budget, a stop string, a cancelled job) and prefills as many waiting
requests as there are free slots, in one batch, while the other rows keep their caches. Text
is decoded on the host per job: stop strings end a job where they complete, and a stream holds
back what could still become a stop string or half of a multi-byte character.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import AsyncIterator, Sequence

import numpy as np

from llasm_jax.errors import UserError
from llasm_jax.infer.batching import SlotEngine, SlotRequest
from llasm_jax.infer.sampling import SamplingParams

log = logging.getLogger("llasm_jax.serve")


class QueueFull(Exception):
  """Every slot is busy and the waiting queue is full: try again after `retry_after` seconds."""

  def __init__(self, waiting: int, retry_after: int):
    self.retry_after = retry_after
    super().__init__(f"the server is busy ({waiting} requests waiting); retry after {retry_after} s")


@dataclasses.dataclass
class Delta:
  text: str  # new visible text (may be "" when only held-back tokens arrived)
  token_ids: list[int]


@dataclasses.dataclass
class Finished:
  reason: str  # "stop" (EOS or a stop string) or "length"
  text: str  # the whole reply
  token_ids: list[int]
  prompt_tokens: int
  ttft_s: float  # submit -> first token
  total_s: float


@dataclasses.dataclass
class Failed:
  message: str


class Job:
  """One request's life: waiting, in a slot, finished. `events()` yields what the scheduler
  thread reports, on the event loop that submitted it."""

  def __init__(self, scheduler: "Scheduler", request: SlotRequest, stop: Sequence[str]):
    self.scheduler, self.request = scheduler, request
    self.stop = [s for s in stop if s]
    self.loop = asyncio.get_running_loop()
    self._queue: asyncio.Queue = asyncio.Queue()
    self.cancelled = False
    self.submitted = time.perf_counter()
    self.first_token_s: float | None = None
    self.tokens: list[int] = []
    self.text = ""
    self.sent = 0  # characters already reported
    self.done = False

  # ---- event loop side -------------------------------------------------------------------

  async def events(self) -> AsyncIterator[Delta | Finished | Failed]:
    while True:
      event = await self._queue.get()
      yield event
      if isinstance(event, (Finished, Failed)):
        return

  def cancel(self) -> None:
    """The client went away: the scheduler drops the job (frees its slot) at its next step."""
    if not self.done:
      self.cancelled = True
      self.scheduler.wake()

  # ---- scheduler thread side -------------------------------------------------------------

  def _emit(self, event) -> None:
    self.loop.call_soon_threadsafe(self._queue.put_nowait, event)

  def add(self, tokens: Sequence[int], eos_ids: Sequence[int]) -> bool:
    """Appends generated tokens; reports the new visible text. True when a stop string or EOS ended it."""
    if self.first_token_s is None:
      self.first_token_s = time.perf_counter() - self.submitted
    new = []
    ended = False
    for t in tokens:
      new.append(int(t))
      if int(t) in eos_ids:
        ended = True
        break
    self.tokens += new
    text = self.scheduler.decode(self.tokens)
    cut = [text.index(s) for s in self.stop if s in text]
    if cut:
      text, ended = text[:min(cut)], True
      # The shortest prefix of the tokens whose text holds the stop string: usage counts those.
      n = next(n for n in range(1, len(self.tokens) + 1)
               if any(s in self.scheduler.decode(self.tokens[:n]) for s in self.stop))
      self.tokens = self.tokens[:n]
    self.text = text
    safe = len(text) if ended else len(text) - max(
        [k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
    if not ended and text[:safe].endswith("\ufffd"):
      safe -= 1
    if safe > self.sent or new:
      self._emit(Delta(text[self.sent:max(safe, self.sent)], new))
      self.sent = max(safe, self.sent)
    return ended

  def finish(self, reason: str) -> None:
    self.done = True
    if self.sent < len(self.text):
      self._emit(Delta(self.text[self.sent:], []))
      self.sent = len(self.text)
    self._emit(Finished(reason, self.text, self.tokens, len(self.request.prompt_ids), self.first_token_s or 0.0,
                        time.perf_counter() - self.submitted))

  def fail(self, message: str) -> None:
    self.done = True
    self._emit(Failed(message))


class Scheduler:
  """Continuous batching over `generator`'s model: `slots` decode rows of `max_len` tokens,
  at most `max_queue` requests waiting for one."""

  def __init__(self, generator, *, slots: int = 8, max_len: int = 2048, chunk: int = 4, max_queue: int = 64):
    self.generator = generator
    # The generator's engine runs the slots: its decode copy of the LLM and audio embedder, not new ones.
    self.engine = SlotEngine(generator.engine, slots=slots, max_len=max_len, chunk=chunk)
    self.max_queue = max_queue
    # The template's system block opens every prompt that sends no system message of its own:
    # prefilled once, so a request prefills only its own turns.
    if generator.tokenizer is not None and generator.template_name != "none":
      self.engine.set_prefix(generator.template().fixed_prefix())
    self.waiting: collections.deque[Job] = collections.deque()
    self.running: dict[int, Job] = {}  # slot -> job
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.stats = collections.Counter()  # served, cancelled, failed, steps, inserts, tokens

  def warmup(self) -> None:
    """Compiles the prefill of one short prompt and the decode step before the first client waits."""
    bos = self.generator.tokenizer.bos_token_id if self.generator.tokenizer is not None else None
    ids = self.engine.prefix_ids + [bos if bos is not None else self.engine.pad_id]
    for _ in range(2):  # the second round on the state the first left: XLA:CPU compiled once more there
      self.engine.insert([SlotRequest(slot=0, prompt_ids=ids, max_new_tokens=2)])
      self.engine.step()
      self.engine.cancel([0])

  def decode(self, ids: Sequence[int]) -> str:
    return self.generator.decode(ids)

  # ---- event loop side -------------------------------------------------------------------

  def check(self, request: SlotRequest) -> None:
    """Raises UserError if the request can never run (too long, bad audio markers, ...)."""
    self.engine.check(request)

  def submit(self, prompt_ids: Sequence[int], mels: Sequence[np.ndarray] = (), *, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), stop: Sequence[str] = ()) -> Job:
    """Queues a request (call from the event loop). Raises UserError for a request that can never
    run, QueueFull when the queue is full."""
    request = SlotRequest(slot=0, prompt_ids=list(prompt_ids), mels=list(mels), max_new_tokens=max_new_tokens,
                          sampling=sampling)
    self.check(request)
    job = Job(self, request, stop)
    with self._cond:
      if len(self.waiting) >= self.max_queue:
        raise QueueFull(len(self.waiting), self.retry_after())
      self.waiting.append(job)
      self._cond.notify()
    return job

  def retry_after(self) -> int:
    """Seconds until a queue place is likely free: the recent time per finished request."""
    per_job = self.stats["busy_s"] / max(self.stats["served"], 1)
    return max(1, int(np.ceil(per_job * max(len(self.waiting), 1) / self.engine.slots)))

  def wake(self) -> None:
    with self._cond:
      self._cond.notify()

  def health(self) -> dict:
    return {"slots": self.engine.slots, "running": len(self.running), "waiting": len(self.waiting),
            "max_len": self.engine.max_len, **{k: round(v, 3) if k.endswith("_s") else int(v) for k, v in self.stats.items()}}

  # ---- the thread ------------------------------------------------------------------------

  def start(self) -> "Scheduler":
    self._thread = threading.Thread(target=self._run, name="llasm-jax-scheduler", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify()
    if self._thread is not None:
      self._thread.join()
    for job in [*self.waiting, *self.running.values()]:
      job.fail("the server is shutting down")
    self.waiting.clear()
    self.running.clear()

  def _run(self) -> None:
    while True:
      with self._cond:
        while not self._stopping and not self.waiting and not self.running:
          self._cond.wait()
        if self._stopping:
          return
      t0 = time.perf_counter()
      try:
        self._drop_cancelled()
        self._admit()
        if self.running:
          self._step()
      except Exception as e:  # a bug or a device error: fail the jobs involved, keep serving
        log.exception("scheduler step failed")
        for slot, job in list(self.running.items()):
          job.fail(f"internal error: {type(e).__name__}: {e}")
          self.engine.cancel([slot])
        self.running.clear()
        self.stats["failed"] += 1
      self.stats["busy_s"] += time.perf_counter() - t0

  def _drop_cancelled(self) -> None:
    with self._cond:
      gone = [j for j in self.waiting if j.cancelled]
      for j in gone:
        self.waiting.remove(j)
    for j in gone:
      j.done = True
    slots = [s for s, j in self.running.items() if j.cancelled]
    for s in slots:
      self.running.pop(s).done = True
    self.engine.cancel(slots)
    self.stats["cancelled"] += len(gone) + len(slots)

  def _admit(self) -> None:
    free = [s for s in range(self.engine.slots) if s not in self.running]
    with self._cond:
      jobs = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
    if not jobs:
      return
    for slot, job in zip(free, jobs):
      job.request.slot = slot
    t0 = time.perf_counter()
    try:
      firsts = self.engine.insert([j.request for j in jobs])
    except UserError as e:  # checked at submit, so unexpected: fail these, keep the others
      for j in jobs:
        j.fail(str(e))
      return
    self.stats["inserts"] += 1
    self.stats["insert_s"] += time.perf_counter() - t0
    for job, first in zip(jobs, firsts):
      self.running[job.request.slot] = job
      ended = job.add([first], self.engine.eos_ids)
      if ended or job.request.max_new_tokens == 1:
        self._end(job.request.slot, "stop" if ended else "length")

  def _step(self) -> None:
    t0 = time.perf_counter()
    step = self.engine.step()
    self.stats["steps"] += 1
    self.stats["step_s"] += time.perf_counter() - t0
    for slot, job in list(self.running.items()):
      new = step.tokens[slot][step.emitted[slot]].tolist()
      self.stats["tokens"] += len(new)
      ended = job.add(new, self.engine.eos_ids) if new else False
      if ended:
        self._end(slot, "stop")
      elif not step.active[slot]:
        self._end(slot, "length")

  def _end(self, slot: int, reason: str) -> None:
    job = self.running.pop(slot)
    self.engine.cancel([slot])  # a stop string ends a row the device still thinks active
    job.finish(reason)
    self.stats["served"] += 1
