"""JAX's persistent compilation cache, on by default: a resumed or repeated job does not compile
its steps again (minutes for a 7B train step on a pod slice).

`train` keeps it in `WORKDIR/compilation_cache` (or `config.train.compilation_cache`, which may
be a bucket shared by runs); the inference commands in `$LLASM_JAX_COMPILATION_CACHE`, default
`~/.cache/llasm_jax/compilation_cache`; "none" turns it off. Executables are keyed by the
program, the devices and the jax/XLA versions, so a cache may be shared by different jobs.
Only people you trust should be able to write to it (it holds code that runs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from llasm_jax import paths

OFF = "none"
ENV = "LLASM_JAX_COMPILATION_CACHE"


def default_folder() -> str:
  """The inference commands' cache: $LLASM_JAX_COMPILATION_CACHE, else under ~/.cache."""
  return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llasm_jax", "compilation_cache")


def enable(folder: str) -> str | None:
  """Points JAX's persistent cache at `folder` (local or gs://), or turns it off for "none";
  returns the folder in use. Safe to call again with another folder (tests, the demo's phases)."""
  folder = None if folder in (OFF, "", None) else paths.join(folder)
  if jax.config.jax_compilation_cache_dir != folder:
    jax.config.update("jax_compilation_cache_dir", folder)
    jax_cache.reset_cache()  # the cache object is built once, on first use: build it again there
  # JAX logs a warning for every executable it cannot serialize (some CPU programs); not for people.
  logging.getLogger("jax._src.compilation_cache").setLevel(logging.ERROR)
  return folder


@contextlib.contextmanager
def using(folder: str) -> Iterator[str | None]:
  """`enable(folder)` for the block, then the cache that was in use before (a library call such
  as `train()` leaves the process as it found it)."""
  before = jax.config.jax_compilation_cache_dir
  try:
    yield enable(folder)
  finally:
    enable(before or OFF)
