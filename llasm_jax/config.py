"""Run configs (ml_collections files in configs/) -> the frozen model dataclasses, and shared defaults.

A run config holds `model` (a preset of `LLASM_PRESETS` plus overrides), `mesh` and
`logical_axis_rules`. The model section reads:

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
from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.train.sections import training_sections


# config.train.loss: cross-entropy on the reference answer, distillation from the frozen LLM
# reading the transcript as text (KL between next-token distributions on the answer tokens),
# (1 - kd_weight) * CE + kd_weight * KL, each a mean over the batch's answer tokens, or CTC alone:
# the adaptor's outputs scored against the LLM's embedding table and aligned to each row's
# transcript (no LLM pass at all: a cheap warm-up of the adaptor). config.train.ctc_weight > 0 adds
# ctc_weight * the CTC mean (per transcript token) to "ce", "kd" or "mix".
LOSSES = ("ce", "kd", "mix", "ctc")


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
  """Imports an ml_collections config file and returns its `get_config()`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} not found; pass --config with a file from configs/")
  spec = importlib.util.spec_from_file_location(f"llasm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {str(path)!r} has no get_config()")
  return module.get_config()


def loss_options(train: Any) -> tuple[str, float, float]:
  """`config.train.{loss, kd_weight, kd_temperature}`, checked; absent keys: ("ce", 0.5, 1.0)."""
  loss = train.get("loss", "ce")
  weight, temperature = float(train.get("kd_weight", 0.5)), float(train.get("kd_temperature", 1.0))
  if loss not in LOSSES:
    raise UserError(f"config.train.loss {loss!r}: expected one of {', '.join(LOSSES)}")
  if loss == "mix" and not 0.0 <= weight <= 1.0:
    raise UserError(f"config.train.kd_weight {weight}: expected a share between 0 and 1 (loss = (1 - w) CE + w KL)")
  if loss in ("kd", "mix") and not temperature > 0:
    raise UserError(f"config.train.kd_temperature {temperature}: expected > 0 (1.0 = the plain distributions)")
  return loss, weight, temperature


def ctc_weight(train: Any) -> float:
  """`config.train.ctc_weight`, checked (absent: 0.0): the CTC mean's weight beside a "ce", "kd" or
  "mix" loss; loss "ctc" is CTC alone, whatever the weight."""
  weight = float(train.get("ctc_weight", 0.0))
  if not weight >= 0.0:
    raise UserError(f"config.train.ctc_weight {weight}: expected >= 0 (0 = no CTC term)")
  return weight


def needs_teacher(config: Any) -> bool:
  """Whether the batches of `config` carry the distillation teacher's text sequences."""
  return loss_options(config.get("train") or {})[0] in ("kd", "mix")


def needs_ctc(config: Any) -> bool:
  """Whether `config` trains with CTC (loss "ctc" or ctc_weight > 0): its batches then carry each
  row's transcript tokens, and its model the CTC blank (LlasmConfig.ctc)."""
  train = config.get("train") or {}
  return loss_options(train)[0] == "ctc" or ctc_weight(train) > 0


def from_model_folder(stage: int, init_from: str) -> ml_collections.ConfigDict:
  """A run config that trains the model folder `init_from` (whose architecture it takes) in LLaSM
  stage 1 or 2, data-parallel over all devices, with the default sections to fill in."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "tiny"})  # unused: init_from's architecture wins
  config.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(stage))
  config.train.init_from = init_from
  return config


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
