"""The machine a benchmark ran on, recorded next to its numbers."""

import platform


def cpu_name() -> str:
  """The CPU model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "cpu"

