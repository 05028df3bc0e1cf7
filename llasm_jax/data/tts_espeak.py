"""espeak-ng text-to-speech through ctypes, on the library and voices the `espeakng-loader` wheel ships.

Legend: N samples at 16 kHz.

No system package: `espeakng_loader.get_library_path()` is libespeak-ng itself and
`get_data_path()` its espeak-ng-data (phoneme tables, dictionaries, voices, variants).
Synthesis runs in espeak's synchronous mode: `espeak_Synth` returns once the whole text is
spoken, and the samples (int16 at 22050 Hz) come through the synth callback, are collected,
then resampled to 16 kHz with soxr.

Determinism: libespeak-ng keeps static state across utterances (its waveform generator's), so
the same text after different predecessors comes out a few samples apart, and
`espeak_Terminate` + `espeak_Initialize` do not reset it. Each utterance
therefore runs on a freshly loaded library (dlopen ~0.6 ms, initialize ~0.3 ms): the output
depends only on (text, voice), whichever worker renders it in whatever order. The library is
loaded from a private copy so that no other user of the same file in this process (another
TTS package) keeps it mapped, which would let the state survive the reload. The library's
globals also make it one engine per process: parallel synthesis uses processes.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import dataclasses
import os
import shutil
import tempfile

import numpy as np

from llasm_jax.data.audio import SAMPLE_RATE
from llasm_jax.data.tts import UtteranceError

# speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a missing data folder as -1 instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # the sentence-final pause: speech does not stop dead at the last sample
_RATE, _VOLUME, _PITCH, _RANGE, _WORDGAP = 1, 2, 3, 4, 7

# Voices chosen for intelligibility by Whisper tiny.en (10 sentences read at 140 and 180 wpm in
# each of 28 voices, then the pool as drawn): the standard American and British voices, in their
# own timbre or a clear variant from espeak-ng-data/voices/!v. Left out: m2, m4-m6, f1, f4, linda,
# belinda, aunty, Annie, Andrea, david, paul, benjamin (20-37% word errors alone), and the
# variants with "breath" (f2, f3, f5, Alicia), which read well but whose breath noise reads
# uninitialized heap memory in libespeak-ng 1.52, so the same utterance changes from run to run
# (tests/data/test_synth.py renders the pools under MALLOC_PERTURB_ to keep it that way).
EN_VOICES = ("en-us", "en-us+m1", "en-us+m3", "en-us+m7", "en-us+steph", "en")
ZH_VOICES = ("cmn", "cmn+m1", "cmn+m3", "cmn+m7", "cmn+steph")


@dataclasses.dataclass(frozen=True)
class EspeakVoice:
  """One utterance's voice: an espeak voice name (`lang+variant`) and its prosody settings."""

  name: str
  rate: int  # words per minute (espeak's unit; 175 is its default)
  pitch: int  # base pitch, 0-100 (50 = the voice's own)
  range: int  # intonation range, 0-100 (50 = the voice's own; 0 = monotone)
  volume: int = 70  # amplitude, percent of espeak's default
  gap: int = 0  # extra pause between words, in 10 ms units
  lead: float = 0.0  # seconds of silence before the speech
  tail: float = 0.0  # and after it


@dataclasses.dataclass(frozen=True)
class VoicePool:
  """Where a language's voices are drawn from: uniform over each list / range."""

  names: tuple[str, ...]
  rate: tuple[int, int]
  pitch: tuple[int, int]
  range: tuple[int, int]
  volume: tuple[int, int] = (60, 80)
  gap: tuple[int, int] = (2, 5)
  lead: tuple[float, float] = (0.2, 0.5)
  tail: tuple[float, float] = (0.2, 0.4)


# English 140-175 wpm is conversational (faster draws lost more words), with 20-50 ms pauses
# between words: tiny.en word errors over the drawn pool 17% -> 11-12% (100 utterances). Mandarin is
# spoken slower per espeak "word" (a syllable of Chinese text), so its pool starts lower, and
# keeps its syllables joined. Volume: at its default (100) espeak's Mandarin saturates int16 on
# 1 in 6 sentences (cmn, 5 texts x 12 settings); at <= 65 none did (peak <= 0.90), and English
# peaks stay below 0.83 at 90.
POOLS = {
    "en": VoicePool(EN_VOICES, rate=(140, 175), pitch=(35, 65), range=(40, 75), volume=(70, 90)),
    "zh": VoicePool(ZH_VOICES, rate=(120, 165), pitch=(35, 65), range=(40, 75), volume=(50, 65), gap=(0, 1)),
}


def _native_paths() -> tuple[str, str]:
  try:
    import espeakng_loader
  except ImportError:
    raise UtteranceError("engine_missing", "the espeak engine needs the espeakng-loader package: "
                      "pip install espeakng-loader") from None
  return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_close_library = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary")  # POSIX, Windows


class EspeakEngine:
  """espeak-ng voices for English and Mandarin (and any other language espeak has a voice for).

  `synthesize(text, language, rng)` draws a voice from `rng` (variant, rate, pitch, intonation
  range, volume, word gap, silence around) and returns float32[N] speech at 16 kHz. One instance per process (espeak is global state).
  """

  name = "espeak"

  def __init__(self, pools: dict[str, VoicePool] | None = None):
    self.pools = dict(POOLS if pools is None else pools)
    library, self.data_path = _native_paths()
    # A private copy: this process's only reference to it, so dlclose really unloads it.
    self._dir = tempfile.mkdtemp(prefix="llasm_espeak_")
    atexit.register(shutil.rmtree, self._dir, True)
    self._library = os.path.join(self._dir, os.path.basename(library))
    shutil.copy(library, self._library)
    self._chunks: list[np.ndarray] = []
    self._callback = _CALLBACK(self._collect)  # held here: ctypes must not free it while espeak holds it
    lib = self._load()
    self.native_rate = self._native_rate
    self.version = self._version(lib)
    self._unload(lib)

  def _collect(self, wav, n: int, events) -> int:
    if wav and n > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0  # 0 = go on

  def _load(self) -> ctypes.CDLL:
    lib = ctypes.CDLL(self._library)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, os.fsencode(self.data_path), _INITIALIZE_DONT_EXIT)
    if rate <= 0:
      self._unload(lib)
      raise UtteranceError("engine_error", f"espeak-ng cannot initialize from {self.data_path!r}; "
                        "reinstall espeakng-loader (pip install --force-reinstall espeakng-loader)")
    self._native_rate = rate
    lib.espeak_SetSynthCallback(self._callback)
    return lib

  @staticmethod
  def _version(lib: ctypes.CDLL) -> str:
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    return (lib.espeak_Info(None) or b"").decode()

  @staticmethod
  def _unload(lib: ctypes.CDLL) -> None:
    lib.espeak_Terminate()
    _close_library(lib._handle)

  def pick_voice(self, language: str, rng: np.random.Generator) -> EspeakVoice:
    """The voice of one utterance: the language's pool, else espeak's own voice of that name."""
    pool = self.pools.get(language) or self.pools.get(language.split("-")[0].lower())
    if pool is None:  # e.g. "fr", "de": espeak's voice for that language, default prosody varied mildly
      pool = VoicePool((language,), rate=(150, 180), pitch=(40, 60), range=(40, 60))
    pick = lambda lo_hi: int(rng.integers(lo_hi[0], lo_hi[1] + 1))
    seconds = lambda lo_hi: round(float(rng.uniform(*lo_hi)), 3)
    return EspeakVoice(name=pool.names[int(rng.integers(len(pool.names)))], rate=pick(pool.rate),
                       pitch=pick(pool.pitch), range=pick(pool.range), volume=pick(pool.volume),
                       gap=pick(pool.gap), lead=seconds(pool.lead), tail=seconds(pool.tail))

  def render(self, text: str, voice: EspeakVoice) -> np.ndarray:
    """float32[N] speech at 16 kHz of `text` in `voice`; the same inputs give the same samples."""
    import soxr

    lib = self._load()
    try:
      if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:  # EE_NOT_FOUND: it would keep the last voice
        raise UtteranceError("unsupported_language", f"espeak-ng has no voice {voice.name!r}; see "
                          "`espeak-ng --voices` for the names (language codes such as en, cmn, fr)")
      for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.range), (_VOLUME, voice.volume),
                           (_WORDGAP, voice.gap)):
        lib.espeak_SetParameter(param, value, 0)
      data = text.encode("utf-8")
      self._chunks = []
      err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
      if err != 0:
        raise UtteranceError("engine_error", f"espeak_Synth failed with error code {err}")
      samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
      self._chunks = []
    finally:
      self._unload(lib)
    audio = samples.astype(np.float32) * np.float32(1 / 32768)
    if len(audio) and self._native_rate != SAMPLE_RATE:
      audio = soxr.resample(audio, self._native_rate, SAMPLE_RATE, quality="HQ")
    if len(audio):
      # espeak speaks from its very first sample; recorded speech has a lead-in, and without one
      # Whisper mishears the first word ("hello world" -> "the low world"; en-us at 150 wpm:
      # tiny.en WER 15.6% -> 11.5% with 0.4 s of silence around the speech).
      audio = np.pad(audio, (round(voice.lead * SAMPLE_RATE), round(voice.tail * SAMPLE_RATE)))
    return np.ascontiguousarray(audio, dtype=np.float32)

  def synthesize(self, text: str, language: str, rng: np.random.Generator) -> np.ndarray:
    """float32[N] speech at 16 kHz of `text` in `language` ("en", "zh", ...), in a voice drawn from `rng`."""
    return self.render(text, self.pick_voice(language, rng))
