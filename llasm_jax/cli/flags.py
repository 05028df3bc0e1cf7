"""The command line's value types and the flags several commands share, declared once."""

from __future__ import annotations

import argparse
import dataclasses
import os

from llasm_jax.quantize import QUANTIZE_HELP, QUANTIZE_MODES


def parse_mesh(text: str) -> dict[str, int]:
  """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}."""
  try:
    return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected axis=size pairs such as data=2,fsdp=2,tensor=2")


def parse_snr(text: str) -> tuple[float, float]:
  """"5,20" -> (5.0, 20.0); "10" -> (10.0, 10.0)."""
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) not in (1, 2):
    raise argparse.ArgumentTypeError(f"--snr {text!r}: expected LO,HI in dB such as 5,20 (or one value)")
  lo, hi = values[0], values[-1]
  if lo > hi:
    raise argparse.ArgumentTypeError(f"--snr {text!r}: LO above HI; give the range low first, e.g. 5,20")
  return lo, hi


def boolean(text: str) -> bool:
  """"true" / "yes" / "1" -> True, "false" / "no" / "0" -> False (any case)."""
  if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
  return text.lower() in ("true", "1", "yes")


# Flags several commands take, declared once: a command names the ones it takes (`add_flags`) and gives
# its own help where its use differs. The demo's come from its Options fields (`dataclass_flags`).
DTYPES = ("float32", "bfloat16")
FLAGS = {
    "ckpt": dict(required=True, help="llasm_jax model folder (from convert or train)"),
    "template": dict(help="prompt template: llasm-cllama2, llasm-baichuan, chat-template (the tokenizer's), or "
                          "none (BOS + the text). Default: the one the model folder records (training's), else "
                          "chat-template if the tokenizer has one, else llasm-cllama2 for LLaSM and none for a "
                          "text-only LLM"),
    "system": dict(help="system prompt (default: the model folder's record, else the template's own: LLaSM's for "
                        "llasm-*, the chat template's for chat-template; '' = none)"),
    "dtype": dict(choices=DTYPES, help="compute dtype (default: the checkpoint's config)"),
    "quantize": dict(choices=QUANTIZE_MODES, default="none", help=QUANTIZE_HELP),
    "config": dict(help="run config whose mesh and logical_axis_rules shard the model"),
    "mesh": dict(type=parse_mesh, help="shard on this mesh, e.g. fsdp=2,tensor=4 (DEFAULT_RULES)"),
    "out": dict(required=True, help="output folder (written atomically)"),
    "overwrite": dict(action="store_true", help="replace --out if it exists"),
    "workers": dict(type=int, default=min(8, os.cpu_count() or 1)),
}
# The flags that load a model to answer with (generate, chat, serve, eval), in their --help order.
LOAD = ("dtype", "quantize", "config", "mesh")


def add_flags(p: argparse.ArgumentParser, *names: str, **helps: str) -> None:
  """Adds the shared flags `names` (FLAGS) to `p`; `helps` holds this command's own help of a flag."""
  for name in names:
    p.add_argument(f"--{name.replace('_', '-')}", **{**FLAGS[name], **({"help": helps[name]} if name in helps else {})})


def dataclass_flags(p: argparse.ArgumentParser, cls) -> None:
  """One flag per field of the dataclass `cls` (`ctc_share` -> `--ctc-share`), its help and choices beside the
  field (`metadata`), its type that of the default (a bool default reads true/false; a None default, text)."""
  for field in dataclasses.fields(cls):
    kind = str if field.default is None else boolean if isinstance(field.default, bool) else type(field.default)
    p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default,
                   choices=field.metadata.get("choices"),
                   help=field.metadata["help"] + ("" if "default" in field.metadata["help"] else " (default: %(default)s)"))

