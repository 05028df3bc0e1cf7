"""The LLaSM composite: `audio` (Whisper), `adaptor` and `llm` (a LLaMA-family decoder).

Legend: B batch, A audio slots per sample, M mel bins, F mel frames, P audio tokens per slot,
T text length, D LLM width, V vocab.

Three modes (see shared/design/LLASM.md):
- "llasm": the released checkpoints. The whole Whisper runs: the decoder reads
  `audio_token_len` copies of its start token against the encoder output of the 30 s padded
  mel; its last hidden state goes through the linear `mm_projector`. P = audio_token_len.
- "encoder": Whisper encoder only, unpadded (per-audio frame counts), k frames stacked, an
  MLP adaptor. P = ceil(ceil(F / 2) / k), which follows the length of each audio.
- "decoder": Whisper's encoder over the audio and a silent tail (to 15 s at least), then its decoder
  transcribing greedily (as `infer.transcribe`); at each of its tokens the decoder state and the
  LLM's embedding of that token (`bridge`, a frozen table over Whisper's vocab) go through the
  `TranscriptAdaptor`. P = audio_token_len, the transcript's tokens last. The speech side is then
  Whisper's own reading (SALSA, arXiv 2408.16542, and DiVA start from these states).
The P audio embeddings of each audio replace the `<au_patch>` embeddings of the text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llasm_jax.layers import KVCache, param_init
from llasm_jax.models.adaptor import (LinearAdaptor, StackedMLPAdaptor, TranscriptAdaptor, UltravoxAdaptor,
                                      text_scale)
from llasm_jax.models.geometry import WINDOW_FRAMES, AudioGeometry
from llasm_jax.models.llama import LLAMA_PRESETS, LlamaConfig, LlamaForCausalLM
from llasm_jax.models.whisper import WHISPER_PRESETS, WhisperConfig, WhisperModel
from llasm_jax.errors import UserError

MODES = ("llasm", "encoder", "decoder")
ADAPTORS = ("mlp", "ultravox")  # "encoder"-mode projectors: `StackedMLPAdaptor`, `UltravoxAdaptor`


@dataclasses.dataclass(frozen=True)
class LlasmConfig:
  audio: WhisperConfig = WHISPER_PRESETS["whisper_large_v2"]  # the speech encoder: config.model.audio
  llm: LlamaConfig = LLAMA_PRESETS["chinese_llama2_7b_llasm"]  # the LLM, audio tokens in its vocab: config.model.llm
  # "llasm": the released models, Whisper encoder + decoder queries and a linear adaptor; "encoder":
  # the Whisper encoder only, its frames stacked by stack_factor into an MLP adaptor.
  # "decoder": Whisper's encoder and greedy decoder; its states along the transcript, with the LLM
  # embeddings of the transcript's tokens, into a `TranscriptAdaptor`.
  mode: str = "llasm"
  # "llasm" mode: decoder queries, hence tokens, per audio; "decoder" mode: the most transcript
  # tokens an audio gives (longer transcripts are cut), and its tokens per audio.
  audio_token_len: int = 64
  stack_factor: int = 8  # "encoder" mode: frames per audio token
  adaptor_hidden: int | None = None  # "encoder" mode MLP width; None = LLM width
  # "encoder" mode projector: "mlp" (Linear -> GELU -> Linear) or "ultravox" (RMSNorm -> Linear ->
  # SwiGLU -> Linear -> RMSNorm scaled like the text embeddings): config.model.adaptor.
  adaptor: str = "mlp"
  audio_patch_id: int = 32000  # <au_patch>: each stands for one audio embedding
  audio_start_id: int = 32001  # <au_start>: opens an audio's span of patches
  audio_end_id: int = 32002  # <au_end>: closes it
  # A learned CTC blank over the LLM's vocab (`ctc_blank`, `Llasm.ctc_logits`): the adaptor's CTC loss
  # (config.train.loss "ctc" / ctc_weight). A training aid: export leaves it out.
  ctc: bool = False
  # LegoSLM (arXiv 2505.11352): the LLM reads, for each audio token, its own embedding rows weighed by
  # the adaptor's CTC posteriors (`Llasm.soft_tokens`), the blank's share on a learned embedding, instead
  # of the adaptor's raw outputs: text-like input from the first step. Needs `ctc`.
  soft_tokens: bool = False
  # "decoder" mode: Whisper's greedy decoding, from its generation config (`convert --mode decoder`).
  decoder_prompt: tuple[int, ...] = ()  # the decoder's prompt: <|startoftranscript|> ... <|notimestamps|>
  decoder_eos: int = 50256  # <|endoftext|>: a transcript ends with it
  decoder_suppress: tuple[int, ...] = ()  # tokens never picked
  decoder_begin_suppress: tuple[int, ...] = ()  # tokens not picked first

  def __post_init__(self):
    for name in ("decoder_prompt", "decoder_suppress", "decoder_begin_suppress"):  # JSON gives lists
      object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
    if self.mode not in MODES:
      raise UserError(f"mode {self.mode!r}: expected one of {MODES}")
    if self.adaptor not in ADAPTORS:
      raise UserError(f"adaptor {self.adaptor!r}: expected one of {ADAPTORS}")
    if self.soft_tokens and not self.ctc:
      raise UserError("soft_tokens weighs the LLM's embeddings by the adaptor's CTC posteriors: it needs ctc=True")
    if self.mode == "decoder" and not self.decoder_prompt:
      raise UserError("mode 'decoder' transcribes with Whisper's decoder and needs its prompt (decoder_prompt, "
                       "e.g. <|startoftranscript|> <|notimestamps|>): make the model with "
                       "`llasm-jax convert --mode decoder`, which reads it from the Whisper's generation config")
    if self.mode == "decoder" and len(self.decoder_prompt) + self.audio_token_len > self.audio.max_target_positions:
      raise UserError(f"audio_token_len {self.audio_token_len}: with the {len(self.decoder_prompt)}-token prompt, more "
                       f"than Whisper's decoder reads ({self.audio.max_target_positions} positions); lower it")
    if self.mode == "decoder" and (self.ctc or self.soft_tokens):
      raise UserError("mode 'decoder' reads Whisper's transcript: it has no CTC head (ctc, soft_tokens); "
                       "train it with config.train.loss='ce' and ctc_weight=0")
    if self.adaptor != "mlp" and self.mode != "encoder":
      raise UserError(f"adaptor {self.adaptor!r} is an 'encoder'-mode projector; mode {self.mode!r} has the "
                       "released linear mm_projector: set mode='encoder' or adaptor='mlp'")
    top = max(self.audio_patch_id, self.audio_start_id, self.audio_end_id)
    if top >= self.llm.vocab_size:
      raise UserError(f"audio token id {top} is outside the LLM vocab ({self.llm.vocab_size}); "
                       "append the audio tokens to the vocab first")

  def geometry(self, mel_frames: int = WINDOW_FRAMES) -> AudioGeometry:
    """The audio geometry of this model with windows of `mel_frames` mel frames (config.data.mel_frames)."""
    return AudioGeometry(self.mode, self.audio_token_len, self.stack_factor, int(mel_frames))

  @property
  def padded_mel(self) -> bool:
    """Whether Whisper reads every audio padded to 30 s ("llasm" mode) or unpadded (the others)."""
    return self.geometry().padded_mel

  @property
  def with_decoder(self) -> bool:
    """Whether the Whisper decoder runs (and its weights are stored)."""
    return self.mode != "encoder"

  @property
  def feature_dim(self) -> int:
    """E of `encode_audio`'s features: Whisper's width, and in "decoder" mode the LLM's beside it."""
    return self.audio.d_model + (self.llm.hidden_size if self.mode == "decoder" else 0)

  def feature_frames(self, mel_frames: int) -> int:
    """S of `encode_audio`'s features for an audio of `mel_frames` mel frames (`AudioGeometry.feature_frames`)."""
    return self.geometry().feature_frames(mel_frames)

  def feature_length_ok(self, length: int, mel_frames: int) -> bool:
    """Whether `encode_audio` may give `length` feature frames for `mel_frames` mel frames (`AudioGeometry`)."""
    return self.geometry().feature_length_ok(length, mel_frames)

  def audio_tokens(self, mel_frames: int) -> int:
    """Audio tokens P that an audio of `mel_frames` mel frames becomes (`AudioGeometry.audio_tokens`)."""
    return self.geometry().audio_tokens(mel_frames)

  def replace(self, **kw) -> "LlasmConfig":
    return dataclasses.replace(self, **kw)


LLASM_PRESETS: dict[str, LlasmConfig] = {
    "llasm_cllama2": LlasmConfig(),
    "llasm_baichuan": LlasmConfig(llm=LLAMA_PRESETS["baichuan_7b_llasm"], audio_patch_id=64000,
                                  audio_start_id=64001, audio_end_id=64002),
    "llasm_cllama2_encoder": LlasmConfig(mode="encoder"),
    # Modern LLMs in "encoder" mode with Whisper large-v3 (128 mel bins): the audio ids are those
    # `llasm-jax convert --llm BASE --whisper W --mode encoder` gives (the tokenizer's next free ids).
    "llasm_llama3_1_8b_encoder": LlasmConfig(
        audio=WHISPER_PRESETS["whisper_large_v3"], llm=LLAMA_PRESETS["llama3_1_8b_llasm"], mode="encoder",
        audio_patch_id=128256, audio_start_id=128257, audio_end_id=128258),
    "llasm_qwen2_5_7b_encoder": LlasmConfig(
        audio=WHISPER_PRESETS["whisper_large_v3"], llm=LLAMA_PRESETS["qwen2_5_7b"], mode="encoder",
        audio_patch_id=151665, audio_start_id=151666, audio_end_id=151667),
    # ~100M parameters: the CPU benchmarks' mid-size model.
    "llasm_100m_encoder": LlasmConfig(audio=WHISPER_PRESETS["whisper_tiny"],
                                      llm=LLAMA_PRESETS["llama_100m"].replace(vocab_size=32003), mode="encoder"),
    "tiny": LlasmConfig(audio=WHISPER_PRESETS["tiny"], llm=LLAMA_PRESETS["tiny"], audio_token_len=8,
                        stack_factor=4, audio_patch_id=253, audio_start_id=254, audio_end_id=255),
    "tiny_encoder": LlasmConfig(audio=WHISPER_PRESETS["tiny"], llm=LLAMA_PRESETS["tiny"], mode="encoder",
                                stack_factor=4, audio_patch_id=253, audio_start_id=254, audio_end_id=255),
}


def check_audio_markers(cfg: LlasmConfig, input_ids: np.ndarray, audio_tokens: np.ndarray) -> None:
  """Host-side check, before any compute, that the text and the audios agree.

  input_ids int[B, T]; audio_tokens int[B, A]: audio tokens of each slot, 0 for an empty slot
  (filled slots first). The j-th `<au_start>` of a sample must be followed by exactly
  audio_tokens[b, j] `<au_patch>` and an `<au_end>`; no patch may stand outside such a span.
  """
  input_ids, audio_tokens = np.asarray(input_ids), np.asarray(audio_tokens)
  if audio_tokens.ndim != 2 or audio_tokens.shape[0] != input_ids.shape[0]:
    raise UserError(f"audio_tokens shape {audio_tokens.shape} should be [batch={input_ids.shape[0]}, audio slots]")
  for b, (ids, counts) in enumerate(zip(input_ids, audio_tokens)):
    counts = [int(c) for c in counts]
    filled = sum(c > 0 for c in counts)
    if any(c > 0 for c in counts[filled:]):
      raise UserError(f"sample {b}: audio slots {counts} have an empty slot before a filled one")
    starts = np.flatnonzero(ids == cfg.audio_start_id)
    if len(starts) != filled:
      raise UserError(f"sample {b}: {len(starts)} <au_start> markers but {filled} audios; "
                       "each audio needs one <au_start> <au_patch>... <au_end> span")
    in_span = np.zeros(len(ids), bool)
    for j, s in enumerate(starts):
      n = counts[j]
      span = ids[s + 1:s + 1 + n]
      if len(span) < n or not np.all(span == cfg.audio_patch_id) or s + 1 + n >= len(ids) \
          or ids[s + 1 + n] != cfg.audio_end_id:
        raise UserError(f"sample {b}: <au_start> at position {s} must be followed by exactly {n} "
                         f"<au_patch> (id {cfg.audio_patch_id}) and <au_end> (id {cfg.audio_end_id})")
      in_span[s + 1:s + 1 + n] = True
    stray = np.flatnonzero((ids == cfg.audio_patch_id) & ~in_span)
    if len(stray):
      raise UserError(f"sample {b}: <au_patch> at positions {stray[:8].tolist()} outside any "
                       "<au_start>...<au_end> span")
    ends = int(np.sum(ids == cfg.audio_end_id))
    if ends != filled:
      raise UserError(f"sample {b}: {ends} <au_end> markers but {filled} audios")


def splice(text_embeds, input_ids, audio_embeds, audio_valid, patch_id: int):
  """Replaces the `<au_patch>` embeddings by the valid audio embeddings, in order.

  text_embeds float[B, T, D], input_ids int[B, T], audio_embeds float[B, A, P, D],
  audio_valid bool[B, A, P]. The n-th patch token of a sample takes the n-th valid audio
  embedding of that sample. Static shapes, no loop over the batch.
  """
  b, a, p, d = audio_embeds.shape
  flat = audio_embeds.reshape(b, a * p, d)
  valid = audio_valid.reshape(b, a * p)
  # Positions of the valid embeddings, in order, then padding positions (stable sort).
  order = jnp.argsort(~valid, axis=1, stable=True)
  is_patch = input_ids == patch_id
  rank = jnp.clip(jnp.cumsum(is_patch, axis=1) - 1, 0, a * p - 1)
  src = jnp.take_along_axis(order, rank, axis=1)
  gathered = jnp.take_along_axis(flat, src[..., None], axis=1)
  return jnp.where(is_patch[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def build_adaptor(cfg: LlasmConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
  """The adaptor that `cfg.mode` and `cfg.adaptor` name, randomly initialised (also `convert`'s fresh one)."""
  if cfg.mode == "llasm":
    return LinearAdaptor(cfg.audio.d_model, cfg.llm.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if cfg.mode == "decoder":
    return TranscriptAdaptor(cfg.audio.d_model, cfg.llm.hidden_size, cfg.adaptor_hidden, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
  cls = UltravoxAdaptor if cfg.adaptor == "ultravox" else StackedMLPAdaptor
  return cls(cfg.audio.d_model, cfg.llm.hidden_size, cfg.stack_factor, cfg.adaptor_hidden, dtype=dtype,
             param_dtype=param_dtype, rngs=rngs)


class CtcBlank(nnx.Module):
  """The one class CTC adds to the LLM's vocab (LegoSLM, arXiv 2505.11352): its logit is
  x . kernel + bias. The kernel starts at zero and the bias at log V, so that at first the blank
  holds about as much probability as all V tokens together (whose logits against the embedding
  table start near zero): CTC's early alignments are mostly blanks, as its optimum mostly is."""

  def __init__(self, width: int, vocab_size: int, *, param_dtype, soft_tokens: bool = False):
    zeros = param_init(nnx.initializers.zeros_init(), ("embed",))
    self.kernel = nnx.Param(zeros(jax.random.key(0), (width,), param_dtype))
    self.bias = nnx.Param(jnp.full((), np.log(vocab_size), param_dtype))
    if soft_tokens:
      self.add_embedding()

  def add_embedding(self) -> None:
    """What a blank frame shows the LLM (`Llasm.soft_tokens`): learned, from zero."""
    zeros = param_init(nnx.initializers.zeros_init(), ("embed",))
    self.embedding = nnx.Param(zeros(jax.random.key(0), self.kernel.shape, self.kernel.dtype))


class Llasm(nnx.Module):
  """Whisper (`audio`) + adaptor (`adaptor`) + LLaMA-family LLM (`llm`), and with `cfg.ctc` the
  CTC blank (`ctc_blank`)."""

  def __init__(self, cfg: LlasmConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype, rngs=rngs)
    self.audio = WhisperModel(cfg.audio, rngs=rngs, with_decoder=cfg.with_decoder)
    self.adaptor = build_adaptor(cfg, **kw)
    self.llm = LlamaForCausalLM(cfg.llm, rngs=rngs)
    if cfg.mode == "decoder":
      # Whisper token -> the LLM's embedding of its text (`convert` writes it from both tokenizers);
      # frozen, part of the speech side: `encode_audio` reads it.
      init = param_init(nnx.initializers.normal(0.02), (None, "embed"))
      self.bridge = nnx.Param(init(rngs.params(), (cfg.audio.vocab_size, cfg.llm.hidden_size), cfg.llm.param_dtype))
    if cfg.ctc:
      self.ctc_blank = CtcBlank(cfg.llm.hidden_size, cfg.llm.vocab_size, param_dtype=cfg.llm.param_dtype,
                                soft_tokens=cfg.soft_tokens)
    if cfg.adaptor == "ultravox":
      self.match_text_scale()

  def match_text_scale(self) -> None:
    """Ultravox adaptor: its output scale (ln_post) := the RMS of the LLM's text embeddings
    (`text_scale`). Done at construction; call again after loading other LLM weights (`convert`
    applies the same rule to the converted table)."""
    weight = self.adaptor.ln_post.weight
    scale = text_scale(self.llm.model.embed_tokens.embedding[...], self.cfg.llm.vocab_size)
    weight[...] = scale.astype(weight.dtype)

  def encode_audio(self, mel: jax.Array, mel_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The frozen Whisper part: mel float[B, A, M, F], mel_lengths int[B, A] (0 = empty slot) ->
    what the adaptor reads, features float[B, A, S, E], and their valid lengths int[B, A].

    "llasm" mode: the decoder states over the `audio_token_len` queries (S = audio_token_len);
    "encoder" mode: the encoder frames of the unpadded audio (S = ceil(F / 2)); "decoder" mode:
    `transcript_features` (S = audio_token_len, the valid length the transcript's tokens). These
    are what `data encode` caches: Whisper is frozen in every training stage, so it can run once.
    """
    cfg = self.cfg
    b, a, m, f = mel.shape
    mel = mel.reshape(b * a, m, f)
    lengths = mel_lengths.reshape(b * a)
    if cfg.mode == "llasm":
      # As released: the 30 s padded mel, no masking, then the decoder over start tokens.
      states, frames = self.audio.encoder(mel)
      queries = jnp.full((b * a, cfg.audio_token_len), cfg.audio.decoder_start_token_id, jnp.int32)
      states, _ = self.audio.decoder(queries, states, frames)
      frames = jnp.full((b * a,), cfg.audio_token_len, jnp.int32)
    elif cfg.mode == "decoder":
      states, frames = self.transcript_features(*self.audio.encoder(mel, lengths))
    else:
      states, frames = self.audio.encoder(mel, lengths)
    frames = jnp.where(lengths > 0, frames, 0)
    # Whisper is frozen in every training stage.
    states = jax.lax.stop_gradient(states)
    return states.reshape(b, a, *states.shape[1:]), frames.reshape(b, a)

  def transcript_features(self, encoder_states: jax.Array, encoder_frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """"decoder" mode: Whisper's greedy transcript of each audio (the steps of `infer.transcribe`:
    the prompt, suppressed tokens, a row stops at <|endoftext|>), at most `audio_token_len` tokens.
    Returns float[N, audio_token_len, E + D], per token the decoder state that chose it beside the
    LLM embedding of it (`bridge`), and their number int[N]: the transcript's tokens and its
    <|endoftext|> (whose state closes the speech), so that only an empty slot (no frames) has 0."""
    cfg = self.cfg
    n, s = encoder_states.shape[0], cfg.audio_token_len
    decoder, vocab = self.audio.decoder, cfg.audio.vocab_size

    def mask(ids):  # bool[V], True at `ids`
      return jnp.zeros((vocab,), bool).at[jnp.asarray(ids, jnp.int32)].set(True)

    suppress, begin = mask(cfg.decoder_suppress), mask(cfg.decoder_suppress + cfg.decoder_begin_suppress)
    prompt = jnp.broadcast_to(jnp.asarray(cfg.decoder_prompt, jnp.int32), (n, len(cfg.decoder_prompt)))
    cache = decoder.init_cache(encoder_states, encoder_frames, prompt.shape[1] + s)
    hidden, cache = decoder(prompt, cache=cache)

    def pick(state, banned):  # state float[N, E] -> token int32[N]
      return jnp.argmax(jnp.where(banned, -jnp.inf, self.audio.logits(state[:, None])[:, 0]), -1).astype(jnp.int32)

    def step(st):
      i, cache, state, done, states, tokens = st
      token = pick(state, jnp.where(i == 0, begin, suppress))
      states = jax.lax.dynamic_update_slice(states, state[:, None].astype(states.dtype), (0, i, 0))
      tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(done, -1, token)[:, None], (0, i))
      done = done | (token == cfg.decoder_eos)
      hidden, cache = decoder(token[:, None], cache=cache)
      return i + 1, cache, hidden[:, 0], done, states, tokens

    # Until every row has ended (a batch of short clips stops early), at most S tokens.
    st = (jnp.int32(0), cache, hidden[:, -1], encoder_frames == 0, jnp.zeros((n, s, hidden.shape[-1]), hidden.dtype),
          jnp.full((n, s), -1, jnp.int32))
    *_, states, tokens = jax.lax.while_loop(lambda st: (st[0] < s) & ~jnp.all(st[3]), step, st)
    valid = tokens >= 0
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    text = jnp.take(self.bridge[...], jnp.maximum(tokens, 0), axis=0)
    features = jnp.concatenate([states.astype(text.dtype), text], axis=-1)
    return jnp.where(valid[..., None], features, 0), lengths

  def adapt(self, features: jax.Array, feature_lengths: jax.Array, *, raw: bool = False) -> tuple[jax.Array, jax.Array]:
    """The adaptor part: features float[B, A, S, E], feature_lengths int[B, A] (0 = empty slot) ->
    audio embeddings float[B, A, P, D] and their validity bool[B, A, P]. With `cfg.soft_tokens` the
    embeddings are `soft_tokens` of the adaptor's outputs, unless `raw` (what CTC scores)."""
    b, a, s, e = features.shape
    embeds, tokens = self.adaptor(features.reshape(b * a, s, e), feature_lengths.reshape(b * a))
    valid = jnp.arange(embeds.shape[1])[None, :] < tokens[:, None]
    if self.cfg.soft_tokens and not raw:
      embeds = self.soft_tokens(embeds, valid)
    return embeds.reshape(b, a, *embeds.shape[1:]), valid.reshape(b, a, -1)

  def ctc_logits(self, audio_embeds: jax.Array, classes: jax.Array | None = None,
                 class_valid: jax.Array | None = None) -> jax.Array:
    """Audio embeddings float[..., P, D] -> CTC logits float32[..., P, V + 1]: each scored against
    the LLM's input embedding rows of the real vocab (V = vocab_size, not the padded table), and
    the blank (`ctc_blank`) as class V, so token ids stay the LLM's. The table is constant here:
    CTC shapes the adaptor, not the vocab. With `classes` int[C] (and their validity bool[C]) only
    those rows are scored: float32[..., P, C + 1], the blank last, invalid classes at -1e9."""
    if not self.cfg.ctc:
      raise UserError("this model has no CTC blank (LlasmConfig.ctc=False); the CTC loss needs "
                       "config.train.loss='ctc' or ctc_weight > 0, which turn it on")
    v = self.cfg.llm.vocab_size
    table = jax.lax.stop_gradient(self.llm.model.embed_tokens.embedding[...][:v])
    if classes is not None:
      table = jnp.take(table, classes, axis=0, mode="clip")  # padding classes (id V) are masked below
    x = audio_embeds.astype(jnp.float32)
    tokens = jnp.einsum("...pd,vd->...pv", x, table.astype(jnp.float32))
    if class_valid is not None:
      tokens = jnp.where(class_valid, tokens, -1e9)
    blank = x @ self.ctc_blank.kernel[...].astype(jnp.float32) + self.ctc_blank.bias[...].astype(jnp.float32)
    return jnp.concatenate([tokens, blank[..., None]], axis=-1)

  def ctc_greedy(self, outputs: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy CTC over adaptor outputs float[N, P, D] with validity bool[N, P]: the logits
    float32[N, P, V + 1], each frame's best class int[N, P] (V = the blank) and the frames CTC's
    collapse keeps bool[N, P] (valid, not the blank, not a repeat of the frame before). The kept
    frames' classes, in order, are the hypothesis: LLM token ids."""
    v = self.cfg.llm.vocab_size
    logits = self.ctc_logits(outputs)
    best = jnp.argmax(logits, axis=-1)
    previous = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=v)
    return logits, best, valid & (best != v) & (best != previous)

  def soft_tokens(self, outputs: jax.Array, valid: jax.Array) -> jax.Array:
    """LegoSLM: adaptor outputs float[..., P, D] with validity bool[..., P] -> what the LLM reads,
    float[..., P, D]: the CTC hypothesis of each audio slot as soft text. Frames whose greedy CTC
    label is the blank or repeats the frame before are dropped (CTC's collapse); each kept frame
    becomes the LLM's embedding rows weighed by its token posteriors (the blank's share left out),
    so a confident frame reads as that token's own embedding. The kept frames end the slot, in
    order; the places before them hold the learned filler (`ctc_blank.embedding`)."""
    *lead, p, d = outputs.shape
    v = self.cfg.llm.vocab_size
    logits, _, keep = self.ctc_greedy(outputs.reshape(-1, p, d), valid.reshape(-1, p))
    probs = jax.nn.softmax(logits[..., :v], axis=-1)
    table = jax.lax.stop_gradient(self.llm.model.embed_tokens.embedding[...][:v]).astype(jnp.float32)
    text = probs @ table  # float32[N, P, D]
    # Kept frames to the end of the slot's valid frames (n), in order: place j shows kept frame j - (n - K).
    kept = jnp.sum(keep, axis=1, keepdims=True)
    n = jnp.sum(valid.reshape(-1, p), axis=1, keepdims=True)
    order = jnp.argsort(~keep, axis=1, stable=True)  # kept frames first, in order
    source = jnp.arange(p)[None, :] - (n - kept)
    shown = jnp.take_along_axis(text, jnp.take_along_axis(order, jnp.maximum(source, 0), axis=1)[..., None], axis=1)
    filler = jnp.broadcast_to(self.ctc_blank.embedding[...].astype(jnp.float32), shown.shape)
    out = jnp.where((source >= 0)[..., None], shown, filler)
    return out.reshape(*lead, p, d).astype(outputs.dtype)

  def embed_audio(self, mel: jax.Array, mel_lengths: jax.Array, *, raw: bool = False) -> tuple[jax.Array, jax.Array]:
    """mel float[B, A, M, F], mel_lengths int[B, A] (0 = empty slot) ->
    audio embeddings float[B, A, P, D] and their validity bool[B, A, P] (`raw`: see `adapt`)."""
    return self.adapt(*self.encode_audio(mel, mel_lengths), raw=raw)

  def embed(self, input_ids, mel=None, mel_lengths=None, *, audio_features=None, audio_feature_lengths=None):
    """Text embeddings with the audio spliced in: float[B, T, D]. The audio comes as mel
    features (Whisper runs here) or as cached `encode_audio` outputs (Whisper skipped)."""
    text = self.llm.embed(input_ids)
    if audio_features is not None:
      audio, valid = self.adapt(audio_features, audio_feature_lengths)
    elif mel is not None:
      audio, valid = self.embed_audio(mel, mel_lengths)
    else:
      return text
    return splice(text, input_ids, audio, valid, self.cfg.audio_patch_id)

  def __call__(
      self,
      input_ids: jax.Array,
      mel: jax.Array | None = None,
      mel_lengths: jax.Array | None = None,
      *,
      audio_features: jax.Array | None = None,
      audio_feature_lengths: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      positions: jax.Array | None = None,
      cache: KVCache | None = None,
      prefix_kv: tuple[jax.Array, jax.Array] | None = None,
      segment_ids: jax.Array | None = None,
      return_hidden: bool = False,
  ) -> tuple[jax.Array, KVCache | None]:
    """input_ids int[B, T] with audio markers, mel float[B, A, M, F], mel_lengths int[B, A]
    (or cached audio_features float[B, A, S, E], audio_feature_lengths int[B, A] instead of mel)
    -> logits float32[B, T, V] and the updated cache. Check the markers on the host first
    with `check_audio_markers`. prefix_kv: see `LlamaModel` (a shared text prefix before every row).
    segment_ids int[B, T]: packed rows (see `LlamaModel`); a row's audio slots then hold its
    samples' audios in the order of their markers, which `splice` keeps with each sample."""
    embeds = self.embed(input_ids, mel, mel_lengths, audio_features=audio_features,
                        audio_feature_lengths=audio_feature_lengths)
    return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                    cache=cache, prefix_kv=prefix_kv, segment_ids=segment_ids, return_hidden=return_hidden)
