"""Run configs (ml_collections files in configs/): loading, command-line overrides, and the model section -> LlasmConfig.

A run config holds `model` (a preset of `LLASM_PRESETS` plus overrides), `mesh` and
`logical_axis_rules`; a training run's `train`, `optim`, `data` and `eval` sections and the loss
policy are training's own (llasm_jax/train/sections.py, llasm_jax/train/losses.py). The model section reads:

  model.preset = "llasm_cllama2"          # a key of LLASM_PRESETS
  model.audio = {"dtype": "bfloat16"}     # WhisperConfig fields to override
  model.llm = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
  model.mode = "encoder"                  # any other LlasmConfig field, at the top level
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any, Mapping

import ml_collections

from llasm_jax.models.llama import LlamaConfig, RopeScaling
from llasm_jax.models.llasm import LLASM_PRESETS, LlasmConfig
from llasm_jax.models.whisper import WhisperConfig
from llasm_jax.errors import UserError


def _fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


def _check_keys(where: str, given: Mapping[str, Any], valid: list[str]) -> None:
  for key in given:
    if key not in valid:
      raise UserError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")


def _as_dict(section: Any, where: str) -> dict[str, Any]:
  if section is None:
    return {}
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise UserError(f"{where} should be a ConfigDict or dict of overrides, got {type(section).__name__}")


def _rope_scaling(value: Any) -> RopeScaling:
  if isinstance(value, RopeScaling):
    return value
  kw = _as_dict(value, "config.model.llm.rope_scaling")
  _check_keys("config.model.llm.rope_scaling", kw, _fields(RopeScaling))
  return RopeScaling(**kw)


def llasm_config(model_cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> LlasmConfig:
  """`config.model` -> LlasmConfig: the preset with the overrides applied."""
  kw = _as_dict(model_cfg, "config.model")
  preset = kw.pop("preset", None)
  if preset not in LLASM_PRESETS:
    raise UserError(f"config.model.preset {preset!r}: expected one of {', '.join(LLASM_PRESETS)}")
  base = LLASM_PRESETS[preset]
  audio_kw = _as_dict(kw.pop("audio", None), "config.model.audio")
  llm_kw = _as_dict(kw.pop("llm", None), "config.model.llm")
  top = [n for n in _fields(LlasmConfig) if n not in ("audio", "llm")]
  _check_keys("config.model", kw, ["preset", "audio", "llm", *top])
  _check_keys("config.model.audio", audio_kw, _fields(WhisperConfig))
  _check_keys("config.model.llm", llm_kw, _fields(LlamaConfig))
  if "rope_scaling" in llm_kw:
    llm_kw["rope_scaling"] = _rope_scaling(llm_kw["rope_scaling"])
  if "lora" in llm_kw:  # one place sets it, so that a run's LoRA is the one its optimizer knows
    raise UserError("config.model.llm.lora: LoRA is set in config.train.lora (rank, alpha, dropout, targets)")
  return base.replace(audio=base.audio.replace(**audio_kw), llm=base.llm.replace(**llm_kw), **kw)


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """`FILE.py` or `FILE.py:ARG` -> FILE's `get_config()` or `get_config(ARG)`: the convention of
  ml_collections.config_flags (the text after the first ':' is the argument), as big_vision writes
  `configs/tiny.py:stage2`. A relative FILE that is not found from here is taken from this checkout."""
  file, *arg = str(path).split(":", 1)
  found = pathlib.Path(file)
  checkout = pathlib.Path(__file__).resolve().parent.parent / found
  if not found.is_file() and not found.is_absolute() and checkout.is_file():
    found = checkout
  if not found.is_file():
    raise FileNotFoundError(f"config file {file!r} not found; pass --config with a file from configs/")
  spec = importlib.util.spec_from_file_location(f"llasm_config_{found.stem}", found)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {file!r} has no get_config()")
  return module.get_config(*arg)


def config_name(path: str | pathlib.Path) -> str:
  """A run's name from its `--config`: "configs/tiny.py:stage2" -> "tiny_stage2", "configs/tiny.py" -> "tiny"."""
  file, *arg = str(path).split(":", 1)
  return "_".join([pathlib.Path(file).stem, *arg])


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies `--config.a.b=value` command-line overrides, typed like the existing field."""
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise UserError(f"{item!r}: overrides look like --config.train.steps=100")
    path, raw = item[len("--config."):].split("=", 1)
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise UserError(f"--config.{path}: config has no section {p!r}")
      node = node[p]
    if leaf not in node:
      raise UserError(f"--config.{path}: unknown key {leaf!r}; keys here: {', '.join(sorted(node.keys()))}")
    node[leaf] = _parse_like(node[leaf], raw, path)


def _parse_like(current: Any, raw: str, path: str) -> Any:
  if isinstance(current, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise UserError(f"--config.{path}={raw}: expected true or false")
    return raw.lower() in ("true", "1")
  if isinstance(current, (int, float)) and not isinstance(current, bool):
    try:
      return type(current)(float(raw)) if isinstance(current, int) and float(raw).is_integer() else float(raw) \
          if isinstance(current, float) else int(raw)
    except ValueError:
      raise UserError(f"--config.{path}={raw}: expected a {type(current).__name__}") from None
  if isinstance(current, (tuple, list)):
    # A Python literal ('("adaptor/.*", "llm/.*")', "(128, 256)"), else text: one string, or
    # several separated by commas (regexes with a comma of their own need the literal form).
    value = _literal(raw)
    if value is None or isinstance(value, str):
      return tuple(p.strip() for p in raw.split(",") if p.strip()) if value is None else (value,)
    if not isinstance(value, (tuple, list)):
      value = (value,)
    if current and isinstance(current[0], str) and not all(isinstance(v, str) for v in value):
      raise UserError(f"--config.{path}={raw}: expected strings, e.g. --config.{path}=a,b or '(\"a\", \"b\")'")
    return tuple(value)
  if current is None:  # e.g. data.system: None stays None, anything else is the text
    return None if raw == "None" else raw
  return raw


def _literal(raw: str):
  """`raw` as a Python literal, None when it is not one (bare text)."""
  import ast

  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return None
