"""Text-to-speech engines for `data synth`: the contract an engine keeps, the registry of their names,
the language codes they take, the per-utterance voice seed, and the error an utterance fails with.

`Engine.synthesize(text, language, rng) -> float32[N] at 16 kHz`; "espeak" (espeak-ng through
ctypes, `tts_espeak.py`) and "piper" (a neural English voice, `tts_piper.py`) are built in,
others register as "module:callable" (a factory) with `register_engine`, or are named so
directly (`--engine mypkg.tts:Engine`): worker processes import them by that name.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from typing import Any, Protocol

import numpy as np

from llasm_jax.errors import UserError


class SynthError(UserError):
  """The run as a whole cannot go on (unreadable input, an engine that cannot start)."""


class UtteranceError(RuntimeError):
  """One utterance that cannot be made (or an engine that cannot load); engines raise it with a short
  `reason` to count it under."""

  def __init__(self, reason: str, message: str):
    self.reason = reason
    super().__init__(message)

  def __reduce__(self):
    return UtteranceError, (self.reason, str(self))


# ---------------------------------------------------------------------------------------------
# Engines.


class Engine(Protocol):
  """A text-to-speech engine; one instance per process, built by a no-argument factory."""

  def synthesize(self, text: str, language: str, rng: np.random.Generator) -> np.ndarray:
    """float32[N] samples in [-1, 1] at 16 kHz of `text` read in `language` ("en", "zh", ...),
    in a voice drawn from `rng` (the same rng state must give the same samples). An exception
    fails this utterance only; one with a `reason` attribute (UtteranceError) is counted under
    it, any other under "engine_error"."""
    ...


ENGINES: dict[str, str] = {"espeak": "llasm_jax.data.tts_espeak:EspeakEngine",
                           "piper": "llasm_jax.data.tts_piper:PiperEngine"}


def register_engine(name: str, factory: str) -> None:
  """Makes `--engine name` build an engine by calling `factory` ("package.module:callable").

  An import path, not a callable: worker processes are spawned fresh and find the engine by
  importing it. Register in the process that runs `synthesize`; workers receive the path.
  """
  if ":" not in factory:
    raise UserError(f"engine factory {factory!r}: expected 'package.module:callable'")
  ENGINES[name] = factory


def engine_factory(engine: str) -> str:
  """The "module:callable" path of a registered name, or `engine` itself if it is such a path."""
  if engine in ENGINES:
    return ENGINES[engine]
  if ":" in engine:
    return engine
  raise SynthError(f"--engine {engine!r}: unknown; registered engines are {sorted(ENGINES)}, "
                   "or name a factory as 'package.module:callable'")


def make_engine(engine: str) -> Engine:
  """An engine instance from a registered name or a "module:callable" path."""
  path = engine_factory(engine)
  module, _, attr = path.partition(":")
  try:
    factory = getattr(importlib.import_module(module), attr)
    made = factory()
  except Exception as e:
    raise SynthError(f"engine {engine!r} ({path}) cannot start: {type(e).__name__}: {e}") from None
  if not callable(getattr(made, "synthesize", None)):
    raise SynthError(f"engine {engine!r} ({path}) has no synthesize(text, language, rng) method")
  return made


_ENGINE: dict[str, Any] = {}  # engine name -> instance or the SynthError that stopped it, per process


def engine_instance(name: str) -> Engine:
  """This process's one instance of engine `name` (one per process: espeak-ng is global state)."""
  if name not in _ENGINE:
    try:
      _ENGINE[name] = make_engine(name)
    except SynthError as e:
      _ENGINE[name] = e
  if isinstance(_ENGINE[name], SynthError):
    raise _ENGINE[name]
  return _ENGINE[name]


# ---------------------------------------------------------------------------------------------
# Languages and voices per utterance.

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_LANGUAGES = {"zh": "zh", "cmn": "zh", "chinese": "zh", "mandarin": "zh", "en": "en", "english": "en"}


def detect_language(text: str) -> str:
  """The language of `text`: "zh" when it holds at least as many CJK ideographs as Latin words (an
  ideograph is about a word), else "en"; so Chinese with an English name in it stays Chinese."""
  n_cjk = len(_CJK.findall(text))
  return "zh" if n_cjk and n_cjk >= len(_LATIN_WORD.findall(text)) else "en"


def normalize_language(language: str | None, text: str) -> str:
  """A row's language code as the engines and builders use it: "zh-CN"/"cmn" -> "zh", "en-US"
  -> "en", None/"" /"auto" -> detected from `text`, anything else (e.g. "fr") unchanged."""
  if not language or language.lower() == "auto":
    return detect_language(text)
  code = language.lower().replace("_", "-")
  return _LANGUAGES.get(code, _LANGUAGES.get(code.split("-")[0], code))


def utterance_rng(seed: int, uid: str) -> np.random.Generator:
  """The rng an utterance's voice is drawn from: a function of (seed, id) alone."""
  h = hashlib.sha256(f"{seed}\0{uid}".encode("utf-8")).digest()
  return np.random.default_rng([int.from_bytes(h[i:i + 4], "little") for i in range(0, 16, 4)])
