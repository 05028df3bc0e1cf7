"""Greedy speech-to-text with the project's own Whisper: batched, jitted, a KV cache and a `while_loop` decode.

Legend: B batch, M mel bins, F mel frames (3000), T encoder frames, P prompt tokens, S cache slots, V vocab.

Follows `transformers` `WhisperForConditionalGeneration.generate` for audio up to 30 s, greedy,
without timestamps (the tests check token identity):
- the mel of the audio padded to 30 s (`AudioPrompts.windows` in "llasm" mode, as a LLaSM
  reads audio: exactly `WhisperFeatureExtractor`), the encoder over all 3000 frames;
- the prompt `<|startoftranscript|>` [`<|lang|>` `<|transcribe|>` on multilingual models]
  `<|notimestamps|>`; with no language given, a multilingual model picks it per audio as
  `detect_language` does (the most likely language token after `<|startoftranscript|>`);
- at every step the generation config's `suppress_tokens` are masked, at the first generated
  position its `begin_suppress_tokens` too; each row stops at `<|endoftext|>`; at most
  `max_length` tokens in all (448: the decoder's positions).
Longer audio is cut into 30 s windows, each transcribed alone, the texts joined with a space
(no timestamp-driven seeking as in Whisper's long-form decoding).

The token facts (`WhisperTokens`) and tokenizer come from the `whisper/` folder that `llasm-jax
convert --whisper W` writes into a model folder (checkpoint.WHISPER_DIR), so the Whisper inside a
LLaSM folder ("llasm" mode: it has its decoder) transcribes too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llasm_jax import checkpoint
from llasm_jax.data import audio as audio_io
from llasm_jax.data.features import MAX_FRAMES
from llasm_jax.data.prompts import AudioPrompts
from llasm_jax.infer.mesh import MeshFunctions, bucket
from llasm_jax.models.geometry import AudioGeometry
from llasm_jax.models.whisper import WhisperConfig, WhisperDecoderCache, WhisperModel
from llasm_jax.errors import UserError

START, EOT, NO_TIMESTAMPS, TRANSCRIBE = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>", "<|transcribe|>"


@dataclasses.dataclass(frozen=True)
class WhisperTokens:
  """The special tokens and token suppression of a Whisper checkpoint (HF `generation_config.json`)."""

  start: int  # <|startoftranscript|>, the decoder's first input
  eos: int  # <|endoftext|>
  no_timestamps: int | None
  transcribe: int | None  # the task token; None on English-only models
  languages: dict[str, int]  # "<|en|>" -> id; empty on English-only models
  suppress: tuple[int, ...] = ()  # masked at every step
  begin_suppress: tuple[int, ...] = ()  # masked at the first generated position
  multilingual: bool = False
  max_length: int = 448  # prompt + generated tokens

  @classmethod
  def from_generation_config(cls, gen: dict[str, Any], cfg: WhisperConfig) -> "WhisperTokens":
    eos = gen.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
      raise UserError("the Whisper generation config has no eos_token_id (<|endoftext|>)")
    languages = {str(k): int(v) for k, v in (gen.get("lang_to_id") or {}).items()}
    multilingual = bool(gen.get("is_multilingual", bool(languages)))
    transcribe = (gen.get("task_to_id") or {}).get("transcribe")
    if multilingual and (not languages or transcribe is None):
      raise UserError("the Whisper generation config says is_multilingual but lacks lang_to_id or "
                       "task_to_id['transcribe']")
    return cls(
        start=int(gen.get("decoder_start_token_id", cfg.decoder_start_token_id)), eos=int(eos),
        no_timestamps=gen.get("no_timestamps_token_id"), transcribe=transcribe if multilingual else None,
        languages=languages if multilingual else {}, suppress=tuple(int(t) for t in gen.get("suppress_tokens") or ()),
        begin_suppress=tuple(int(t) for t in gen.get("begin_suppress_tokens") or ()), multilingual=multilingual,
        max_length=min(int(gen.get("max_length") or cfg.max_target_positions), cfg.max_target_positions))

  @classmethod
  def from_folder(cls, folder: str, cfg: WhisperConfig) -> "WhisperTokens":
    """From `folder/whisper/generation_config.json` (or `folder/generation_config.json` of a
    Whisper-only folder); checkpoints older than generation configs keep the lists in config.json."""
    for where in (os.path.join(folder, checkpoint.WHISPER_DIR), folder):
      path = os.path.join(where, "generation_config.json")
      if os.path.exists(path) and (where != folder or checkpoint.read_meta(folder)["kind"] == "whisper"):
        with open(path) as f:
          return cls.from_generation_config(json.load(f), cfg)
    raise UserError(f"{folder}: no Whisper generation_config.json (in {checkpoint.WHISPER_DIR}/), so the special "
                     "and suppressed tokens are unknown; convert the Whisper again with `llasm-jax convert "
                     "--whisper W`, from a folder that holds generation_config.json")

  def prompt(self, language: int | None) -> list[int]:
    """The decoder prompt; `language` is the id of a language token (multilingual models)."""
    ids = [self.start]
    if self.multilingual:
      ids += [self.start if language is None else language, self.transcribe]  # detection fills slot 1
    if self.no_timestamps is not None:
      ids.append(self.no_timestamps)
    return ids


@flax.struct.dataclass
class TranscribeState:
  """What the greedy decode loop carries (the cache is updated in place, step after step).

  cache:  the decoder's self-attention KV cache (P + slots) and the encoder's cross-attention
          keys and values (`WhisperDecoderCache`)
  tokens: int32[B, slots] generated tokens, EOS after a row's end
  length: int32[]        tokens generated so far (rows step together)
  last:   int32[B]       the newest token, the next decoder input
  done:   bool[B]        rows that produced EOS (or are batch padding)
  """

  cache: WhisperDecoderCache
  tokens: jax.Array
  length: jax.Array
  last: jax.Array
  done: jax.Array


@dataclasses.dataclass
class TranscribeTimings:
  """Seconds of the last `transcribe` call (compilation included on a bucket's first call)."""

  features_s: float = 0.0
  model_s: float = 0.0  # encoder, language detection, prefill and decode
  windows: int = 0  # 30 s windows transcribed
  tokens: int = 0  # generated, EOS excluded

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


class Transcriber:
  """A Whisper (encoder and decoder) with its token facts and tokenizer, on one device or a mesh
  (`fns`: the jitted function, shardings and transfers)."""

  def __init__(self, model: WhisperModel, tokens: WhisperTokens, tokenizer=None, *,
               mesh: jax.sharding.Mesh | None = None, rules: Sequence[tuple[str, object]] | None = None):
    if not isinstance(model, WhisperModel) or not hasattr(model, "decoder"):
      raise UserError(f"transcription needs a Whisper with its decoder, got a {type(model).__name__} "
                       f"{'without decoder' if isinstance(model, WhisperModel) else ''}".rstrip())
    self.fns = MeshFunctions(mesh, rules)
    self.mesh, self.rules, self.traces = self.fns.mesh, self.fns.rules, self.fns.traces
    self.model, self.cfg, self.tokens, self.tokenizer = model, model.cfg, tokens, tokenizer
    # One 30 s window -> its log-mel padded to 30 s, as Whisper's feature extractor makes it.
    self.window = AudioPrompts(geometry=AudioGeometry(mode="llasm"), num_mel_bins=model.cfg.num_mel_bins)
    self.fns.place(model)
    self.graphdef, self.state = nnx.split(model)
    v = self.cfg.vocab_size
    bad = [t for t in (*tokens.suppress, *tokens.begin_suppress, *tokens.languages.values()) if not 0 <= t < v]
    if bad:
      raise UserError(f"Whisper token id {bad[0]} from the generation config is outside the vocab ({v})")
    self._suppress = np.zeros(v, bool)
    self._suppress[list(tokens.suppress)] = True
    self._begin = np.zeros(v, bool)
    self._begin[list(tokens.begin_suppress)] = True
    self._languages = np.zeros(v, bool)
    self._languages[list(tokens.languages.values())] = True
    self.timings = TranscribeTimings()

  @classmethod
  def load(cls, folder: str, *, mesh=None, rules=None, **run) -> "Transcriber":
    """Restores the Whisper of a "whisper" folder, or of a "llasm"-mode LLaSM folder (its LLM is
    not read), onto one device or sharded on `mesh`; `run` sets dtype, scan_layers, ..."""
    folder = os.fspath(folder)
    meta = checkpoint.read_meta(folder)
    if meta["kind"] == "llama":
      raise UserError(f"--ckpt {folder!r} is a text-only LLM; transcription needs a Whisper "
                       "(`llasm-jax convert --whisper W --out DIR`)")
    if meta["kind"] == "llasm" and meta["config"].get("mode") != "llasm":
      raise UserError(f"--ckpt {folder!r} is an {meta['config'].get('mode')!r}-mode LLaSM, whose Whisper has no "
                       "decoder; transcribe with a Whisper folder (`llasm-jax convert --whisper W --out DIR`)")
    model, _ = checkpoint.load_whisper(folder, mesh=mesh, rules=rules, **run)
    local = checkpoint.companions(folder)  # tokenizer and configs; a bucket's are downloaded
    tokens = WhisperTokens.from_folder(local, model.cfg)
    tokenizer = None
    for where in (os.path.join(local, checkpoint.WHISPER_DIR), local if meta["kind"] == "whisper" else None):
      if where and any(os.path.exists(os.path.join(where, f)) for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(where)
        break
    return cls(model, tokens, tokenizer, mesh=mesh, rules=rules)

  # ---- inputs ----------------------------------------------------------------------------

  def features(self, audio) -> list[np.ndarray]:
    """One audio (a path, 16 kHz samples float32[N], or a log-mel float32[M, 3000]) -> the
    log-mel of each 30 s window, float32[M, 3000] (zero-padded, as Whisper reads it): the audio
    cut into 30 s windows (`audio.split_windows`), each made a log-mel by `AudioPrompts.windows`
    in "llasm" mode, as a LLaSM reads one."""
    m = self.cfg.num_mel_bins
    if isinstance(audio, np.ndarray) and audio.ndim == 2:
      if audio.shape != (m, MAX_FRAMES):
        raise UserError(f"a 2-D audio array {audio.shape} is taken as log-mel features and must be "
                         f"[{m}, {MAX_FRAMES}] (30 s); pass 16 kHz samples float32[N] instead")
      return self.window.windows(audio)
    if isinstance(audio, (str, os.PathLike)):
      samples, name = audio_io.load_audio(audio), os.fspath(audio)
    else:
      samples, name = np.asarray(audio, np.float32).reshape(-1), "waveform"
    if samples.size == 0:
      raise audio_io.AudioError(name, "empty", "no samples (0 s of audio)")
    return [mel for w in audio_io.split_windows(samples) for mel in self.window.windows(w)]

  def language_id(self, language: str | None) -> int | None:
    """"en", "english" or "<|en|>" -> the id of its language token; None -> None (detect)."""
    if language is None:
      return None
    if not self.tokens.multilingual:
      if language.lower().strip("<|>") in ("en", "english"):
        return None
      raise UserError(f"language {language!r}: this Whisper is English-only; pass language=None or 'en'")
    code = language.lower().strip()
    if not code.startswith("<|"):
      if len(code) > 3:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        code = TO_LANGUAGE_CODE.get(code, code)
      code = f"<|{code}|>"
    if code not in self.tokens.languages:
      raise UserError(f"language {language!r}: not one of this Whisper's {len(self.tokens.languages)} languages "
                       f"({', '.join(k.strip('<|>') for k in list(self.tokens.languages)[:12])}, ...)")
    return self.tokens.languages[code]

  # ---- the jitted function ---------------------------------------------------------------

  def _transcribe_fn(self, state, mel, prompt, active, detect, until, suppress, begin, languages, *, slots: int):
    """mel float[B, M, F], prompt int32[B, P], active bool[B] (False: batch padding), detect bool[B]
    (rows whose language slot 1 is to be detected), until int32[] (tokens to generate at most),
    suppress / begin / languages bool[V] -> generated tokens int32[B, slots] (EOS after each
    row's end) and the prompt with the detected languages int32[B, P]. The cache has P + slots
    entries (S)."""
    self.traces["transcribe"] += 1
    model = nnx.merge(self.graphdef, state)
    eos = self.tokens.eos
    b, p = prompt.shape
    states, frames = model.encoder(mel)
    if self.tokens.multilingual:
      # detect_language: the logits after <|startoftranscript|>, language tokens only. One decoder
      # step, always run: a second executable for batches without detection would cost more.
      hidden, _ = model.decoder(prompt[:, :1], states, frames)
      logits = jnp.where(languages, model.logits(hidden)[:, 0], -jnp.inf)
      prompt = prompt.at[:, 1].set(jnp.where(detect, jnp.argmax(logits, -1).astype(jnp.int32), prompt[:, 1]))

    def pick(hidden, mask):
      logits = model.logits(hidden)[:, 0]
      return jnp.argmax(jnp.where(mask, -jnp.inf, logits), -1).astype(jnp.int32)

    cache = model.decoder.init_cache(states, frames, p + slots)
    hidden, cache = model.decoder(prompt, cache=cache)
    first = pick(hidden[:, -1:], suppress | begin)
    tokens = jnp.full((b, slots), eos, jnp.int32).at[:, 0].set(first)

    def step(st: TranscribeState) -> TranscribeState:
      step_model = nnx.merge(self.graphdef, state)
      hidden, cache = step_model.decoder(st.last[:, None], cache=st.cache)
      token = jnp.where(st.done, eos, pick(hidden, suppress))
      tokens = jax.lax.dynamic_update_slice(st.tokens, token[:, None], (0, st.length))
      return TranscribeState(cache=cache, tokens=tokens, length=st.length + 1, last=token,
                             done=st.done | (token == eos))

    st = TranscribeState(cache=cache, tokens=tokens, length=jnp.int32(1), last=first, done=~active | (first == eos))
    st = jax.lax.while_loop(lambda st: (st.length < until) & ~jnp.all(st.done), step, st)
    return st.tokens, prompt

  def _input_shardings(self) -> tuple:
    """Shardings of the host inputs of `_transcribe_fn` after the parameters (None on one device)."""
    fns = self.fns
    rows, rep = fns.logical(("batch",)), fns.replicated()
    return (fns.logical(("batch", None, None)), fns.logical(("batch", None)), rows, rows, rep, rep, rep, rep)

  def _function(self, slots: int):
    in_sh = out_sh = None
    if self.mesh is not None:
      in_sh = (self.fns.shardings_of(self.state), *self._input_shardings())
      out_sh = (self.fns.logical(("batch", None)),) * 2
    return self.fns.jit("transcribe", self._transcribe_fn, in_sh, out_sh, slots=slots)

  # ---- host side -------------------------------------------------------------------------

  def generate_ids(self, mels: Sequence[np.ndarray], languages: Sequence[str | None] | None = None, *,
                   max_new_tokens: int | None = None) -> tuple[list[list[int]], list[int | None]]:
    """Greedy tokens of each 30 s log-mel float32[M, 3000] (one batch; EOS and prompt excluded)
    and the language token each was transcribed in (None on English-only models)."""
    if not len(mels):
      return [], []
    langs = [self.language_id(x) for x in (languages if languages is not None else [None] * len(mels))]
    if len(langs) != len(mels):
      raise UserError(f"{len(langs)} languages for {len(mels)} audios; pass one per audio, or one language")
    p = len(self.tokens.prompt(None))
    limit = self.tokens.max_length - p
    max_new = limit if max_new_tokens is None else int(max_new_tokens)
    if not 1 <= max_new <= limit:
      raise UserError(f"max_new_tokens {max_new}: expected 1..{limit} (Whisper reads {self.tokens.max_length} "
                       f"tokens, {p} of them the prompt)")
    rows = self.fns.rows(len(mels))
    mel = np.zeros((rows, self.cfg.num_mel_bins, self.cfg.max_mel_frames), np.float32)
    prompt = np.tile(np.int32(self.tokens.prompt(None)), (rows, 1))  # batch padding rows: inactive
    for i, x in enumerate(mels):
      mel[i] = x
      prompt[i] = self.tokens.prompt(langs[i])
    active = np.arange(rows) < len(mels)
    detect = active & np.array([self.tokens.multilingual and (i >= len(langs) or langs[i] is None)
                                for i in range(rows)])
    # Bucketed, so that other max_new_tokens reuse the executable, within the decoder's positions.
    fn = self._function(min(bucket(max_new), limit))
    inputs = (mel, prompt, active, detect, np.int32(max_new), self._suppress, self._begin, self._languages)
    with self.fns.tracing():
      tokens, prompt_out = fn(self.state, *(self.fns.put(x, sh) for x, sh in zip(inputs, self._input_shardings())))
      tokens, prompt_out = self.fns.get(tokens), self.fns.get(prompt_out)
    out = []
    for row in tokens[:len(mels), :max_new].tolist():
      out.append(row[:row.index(self.tokens.eos)] if self.tokens.eos in row else row)
    found = [int(prompt_out[i, 1]) if self.tokens.multilingual else None for i in range(len(mels))]
    return out, found

  def decode(self, ids: Sequence[int]) -> str:
    if self.tokenizer is None:
      raise UserError("this Whisper folder has no tokenizer (whisper/tokenizer.json or vocab.json); convert it "
                       "again with `llasm-jax convert --whisper W` from a folder that holds one")
    return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

  def transcribe(self, audios: Sequence[Any], language: str | Sequence[str | None] | None = None, *,
                 batch_size: int = 16, max_new_tokens: int | None = None) -> list[str]:
    """The text of each audio (paths, 16 kHz samples, or 30 s log-mels). language: one for all,
    one per audio, or None (multilingual models detect it per 30 s window)."""
    if isinstance(audios, (str, bytes, os.PathLike)):
      raise UserError("audios should be a list (one entry per audio), got a single path")
    if batch_size < 1:
      raise UserError(f"batch_size {batch_size}: expected >= 1")
    per_audio = list(language) if isinstance(language, (list, tuple)) else [language] * len(audios)
    if len(per_audio) != len(audios):
      raise UserError(f"{len(per_audio)} languages for {len(audios)} audios; pass one per audio, or one language")
    if self.tokenizer is None:
      self.decode([])  # raises: the texts need the tokenizer
    self.timings = timings = TranscribeTimings()
    t0 = time.perf_counter()
    windows, owner = [], []
    for i, a in enumerate(audios):
      for w in self.features(a):
        windows.append(w)
        owner.append(i)
    timings.features_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts: list[list[str]] = [[] for _ in audios]
    for s in range(0, len(windows), batch_size):
      chunk = slice(s, s + batch_size)
      ids, _ = self.generate_ids(windows[chunk], [per_audio[o] for o in owner[chunk]], max_new_tokens=max_new_tokens)
      for o, row in zip(owner[chunk], ids):
        texts[o].append(self.decode(row))
        timings.tokens += len(row)
    timings.model_s = time.perf_counter() - t0
    timings.windows = len(windows)
    return [" ".join(t for t in parts if t) for parts in texts]


def transcribe(model, audios: Sequence[Any], language: str | Sequence[str | None] | None = None, *,
               batch_size: int = 16, max_new_tokens: int | None = None, mesh=None, rules=None) -> list[str]:
  """`Transcriber.load(model).transcribe(...)` for a model folder; a `Transcriber` is used as it is."""
  transcriber = model if isinstance(model, Transcriber) else Transcriber.load(model, mesh=mesh, rules=rules)
  return transcriber.transcribe(audios, language, batch_size=batch_size, max_new_tokens=max_new_tokens)
