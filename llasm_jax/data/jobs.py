"""Work over many rows for the data tools (build, synth): worker processes, messages beside the bar, JSONL out."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence


def _each(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
  return [fn(item) for item in items]


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, batch: int = 1) -> Iterator[Any]:
  """`fn` over `items`, results in order: in this process (workers <= 0), else in `workers` spawned
  processes, `batch` items a task (IPC per item can cost as much as the item itself) with at most
  4 tasks per worker in flight, so results (decoded audio) never pile up ahead of the consumer.
  `fn` must pickle: a module-level function or a functools.partial of one."""
  if workers <= 0 or not items:
    for item in items:
      yield fn(item)
    return
  tasks = (items[i:i + batch] for i in range(0, len(items), batch))
  # spawn: the CLI process has imported JAX, whose threads do not survive fork().
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    pending = collections.deque(pool.submit(_each, fn, task) for _, task in zip(range(4 * workers), tasks))
    try:
      while pending:
        yield from pending.popleft().result()
        task = next(tasks, None)
        if task is not None:
          pending.append(pool.submit(_each, fn, task))
    except BaseException:  # an error, or the consumer stopped early: no more work starts
      for future in pending:
        future.cancel()
      raise


def say(msg: str, quiet: bool) -> None:
  """`msg` on stderr above the progress bar, unless `quiet`."""
  if not quiet:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def write_jsonl(path: str, rows: Iterable[dict[str, Any]], ensure_ascii: bool = False) -> None:
  """One JSON object a line, written under a temporary name and renamed: a file that exists is whole."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
  os.replace(tmp, path)
