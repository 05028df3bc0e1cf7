"""OpenAI Whisper (encoder and decoder) in Flax NNX, any size from tiny to large-v3.

Legend: B batch, M mel bins, F mel frames (<= 3000), T encoder frames (F/2), U decoder
length, D model width, N heads, H head dim, V vocab, L layers.

Submodule names follow Hugging Face `WhisperModel` (`encoder.conv1`, `encoder.layers.N.self_attn`,
`decoder.layers.N.encoder_attn`, ...). Unlike HF, the encoder accepts fewer than 3000 mel frames
(positions are sliced) and per-sample valid lengths, so short audio need not be padded to 30 s.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llasm_jax.layers import Buffer, KVCache, LayerStack, attend, cached_mask, causal_mask, constrain, dense, layer_norm, param_init
from llasm_jax.layers.attention import write_kv_stacked
from llasm_jax.layers.common import embed_lookup
from llasm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
  """Architecture of a Whisper model; field names follow the HF `config.json`."""

  num_mel_bins: int = 80  # M: log-mel bins of the input (128 for large-v3)
  d_model: int = 1280  # D: the width of encoder and decoder
  encoder_layers: int = 32  # the encoder runs in both modes
  encoder_attention_heads: int = 20  # encoder heads (of d_model / heads features each)
  encoder_ffn_dim: int = 5120  # the encoder MLP width
  decoder_layers: int = 32  # the decoder is built in "llasm" mode only
  decoder_attention_heads: int = 20  # decoder heads (self- and cross-attention)
  decoder_ffn_dim: int = 5120  # the decoder MLP width
  vocab_size: int = 51865  # decoder token embedding rows
  max_source_positions: int = 1500  # encoder positions: 30 s, 3000 mel frames halved by the stride-2 conv
  max_target_positions: int = 448  # decoder positions (learned embeddings)
  scale_embedding: bool = False  # decoder token embeddings times sqrt(d_model)
  decoder_start_token_id: int = 50258  # <|startoftranscript|>: each of "llasm" mode's audio_token_len queries
  layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
  # How to run, not what is stored:
  dtype: str = "float32"  # compute dtype of activations and matmuls ("float32" or "bfloat16")
  param_dtype: str = "float32"  # dtype the weights are kept in
  scan_layers: bool = True  # run the layers as one scan (compiles fast) or unrolled; the same numbers
  remat_policy: str = "none"  # recompute in the backward pass: none, full, dots, dots_no_batch, save_everything
  attention_impl: str | None = None  # None (XLA), "xla" or "cudnn"

  @property
  def max_mel_frames(self) -> int:
    return 2 * self.max_source_positions

  def replace(self, **kw) -> "WhisperConfig":
    return dataclasses.replace(self, **kw)


def _size(d, layers, heads, vocab=51865, mels=80, start=50258):
  return WhisperConfig(
      num_mel_bins=mels, d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
      encoder_ffn_dim=4 * d, decoder_layers=layers, decoder_attention_heads=heads,
      decoder_ffn_dim=4 * d, vocab_size=vocab, decoder_start_token_id=start)


WHISPER_PRESETS: dict[str, WhisperConfig] = {
    "whisper_tiny": _size(384, 4, 6),
    "whisper_base": _size(512, 6, 8),
    "whisper_small": _size(768, 12, 12),
    "whisper_medium": _size(1024, 24, 16),
    "whisper_large_v2": _size(1280, 32, 20),
    "whisper_large_v3": _size(1280, 32, 20, vocab=51866, mels=128),
    "tiny": WhisperConfig(
        num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=128,
        max_source_positions=1500, max_target_positions=96, decoder_start_token_id=1),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """float32[length, channels] encoder positions, the values Whisper checkpoints store."""
  log_inc = math.log(max_timescale) / (channels // 2 - 1)
  inv_timescales = np.exp(-log_inc * np.arange(channels // 2, dtype=np.float32))
  scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
  return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def encoder_frames(mel_frames):
  """Encoder frames produced from `mel_frames` mel frames (conv2 has stride 2)."""
  return (mel_frames - 1) // 2 + 1


class WhisperAttention(nnx.Module):
  """Self- or cross-attention; as in Whisper, k_proj has no bias and q is scaled before q.k."""

  def __init__(self, d: int, heads: int, impl, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.head_dim, self.impl = heads, d // heads, impl
    self.q_proj = dense(d, d, ("embed", "heads"), use_bias=True, **kw)
    self.k_proj = dense(d, d, ("embed", "heads"), use_bias=False, **kw)
    self.v_proj = dense(d, d, ("embed", "heads"), use_bias=True, **kw)
    self.out_proj = dense(d, d, ("heads", "embed"), use_bias=True, **kw)

  def _split(self, x):
    return x.reshape(*x.shape[:2], self.heads, self.head_dim)

  def project_kv(self, x):
    """float[B, S, D] -> k, v float[B, S, N, H]."""
    return self._split(self.k_proj(x)), self._split(self.v_proj(x))

  def __call__(self, x, k, v, mask, heads_first: bool = False):
    """x float[B, U, D]; k, v float[B, S, N, H] (or [B, N, S, H], `heads_first`: cached) -> float[B, U, D]."""
    q = self._split(self.q_proj(x) * self.head_dim**-0.5)
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    out = attend(q, k, v, mask, scale=1.0, implementation=self.impl, heads_first=heads_first)
    return self.out_proj(out.reshape(*x.shape[:2], -1))


def _mlp(cfg: WhisperConfig, ffn: int, rngs: nnx.Rngs):
  kw = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
  return dense(cfg.d_model, ffn, ("embed", "mlp"), **kw), dense(ffn, cfg.d_model, ("mlp", "embed"), **kw)


def _ln(cfg: WhisperConfig, rngs: nnx.Rngs):
  return layer_norm(cfg.d_model, cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


class WhisperEncoderLayer(nnx.Module):

  def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
    self.self_attn_layer_norm = _ln(cfg, rngs)
    self.self_attn = WhisperAttention(cfg.d_model, cfg.encoder_attention_heads, cfg.attention_impl,
                                      dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.final_layer_norm = _ln(cfg, rngs)
    self.fc1, self.fc2 = _mlp(cfg, cfg.encoder_ffn_dim, rngs)

  def __call__(self, x, _, *, mask):
    h = self.self_attn_layer_norm(x)
    x = x + self.self_attn(h, *self.self_attn.project_kv(h), mask)
    x = x + self.fc2(_gelu(self.fc1(self.final_layer_norm(x))))
    return constrain(x, ("batch", "length", "act_embed")), None


class WhisperEncoder(nnx.Module):

  def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    conv = dict(kernel_size=(3,), dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                bias_init=param_init(nnx.initializers.zeros_init(), ("embed",)))
    self.conv1 = nnx.Conv(cfg.num_mel_bins, cfg.d_model, padding=((1, 1),), **conv,
                          kernel_init=param_init(nnx.initializers.lecun_normal(), ("conv", "mel", "embed")))
    self.conv2 = nnx.Conv(cfg.d_model, cfg.d_model, strides=(2,), padding=((1, 1),), **conv,
                          kernel_init=param_init(nnx.initializers.lecun_normal(), ("conv", "embed_in", "embed")))
    self.embed_positions = Buffer(jnp.asarray(sinusoids(cfg.max_source_positions, cfg.d_model), cfg.param_dtype))
    self.layers = LayerStack(lambda r: WhisperEncoderLayer(cfg, rngs=r), cfg.encoder_layers, rngs=rngs)
    self.layer_norm = _ln(cfg, rngs)

  def __call__(self, mel: jax.Array, mel_lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """mel float[B, M, F] (F <= 3000) -> states float[B, T, D] and valid frames int32[B].

    With `mel_lengths` int[B], frames past each length are masked everywhere (conv inputs and
    attention keys), so each sample's valid states equal an unpadded run of that sample alone.
    """
    cfg = self.cfg
    b, m, f = mel.shape
    if m != cfg.num_mel_bins:
      raise UserError(f"mel has {m} bins, this Whisper expects num_mel_bins={cfg.num_mel_bins}")
    if f > cfg.max_mel_frames:
      raise UserError(f"mel has {f} frames, more than the {cfg.max_mel_frames} of 30 s; split long audio into windows")
    x = jnp.swapaxes(mel, 1, 2).astype(cfg.dtype)  # [B, F, M]
    if mel_lengths is None:
      mel_lengths = jnp.full((b,), f, jnp.int32)
    mel_valid = (jnp.arange(f)[None, :] < mel_lengths[:, None])[..., None]
    x = _gelu(self.conv1(jnp.where(mel_valid, x, 0)))
    x = _gelu(self.conv2(jnp.where(mel_valid, x, 0)))
    t = x.shape[1]
    x = x + self.embed_positions[...][:t].astype(cfg.dtype)
    frames = encoder_frames(mel_lengths).astype(jnp.int32)
    key_valid = jnp.arange(t)[None, :] < frames[:, None]
    mask = key_valid[:, None, None, :]
    x, _ = self.layers(constrain(x, ("batch", "length", "act_embed")), None,
                       scan=cfg.scan_layers, remat_policy=cfg.remat_policy, mask=mask)
    return self.layer_norm(x), frames


@flax.struct.dataclass
class WhisperDecoderCache:
  """What the decoder carries from call to call: `init_cache` makes it, each cached call returns
  the next (the same protocol as the LLM's: `LayerStack(carry_per_layer=True)`, `write_kv_stacked`).

  self_kv:      the self-attention `KVCache`: k, v float[L, B, N, S, H], written in place U slots
                per call; mask bool[B, S]; index int32[] (or int32[B], a slot per row)
  cross_k,
  cross_v:      float[L, B, N, T, H] every layer's cross-attention keys and values of the encoder
                states, projected once by `init_cache` and only read
  encoder_mask: bool[B, T] encoder frames that are real (not padding)
  """

  self_kv: KVCache
  cross_k: jax.Array
  cross_v: jax.Array
  encoder_mask: jax.Array


class WhisperDecoderLayer(nnx.Module):

  def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
    attn = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.self_attn_layer_norm = _ln(cfg, rngs)
    self.self_attn = WhisperAttention(cfg.d_model, cfg.decoder_attention_heads, cfg.attention_impl, **attn)
    self.encoder_attn_layer_norm = _ln(cfg, rngs)
    self.encoder_attn = WhisperAttention(cfg.d_model, cfg.decoder_attention_heads, cfg.attention_impl, **attn)
    self.final_layer_norm = _ln(cfg, rngs)
    self.fc1, self.fc2 = _mlp(cfg, cfg.decoder_ffn_dim, rngs)

  def cross_kv(self, encoder_states, _):
    """float[B, T, D] -> this layer's cross-attention k, v float[B, N, T, H] (heads first, as cached)."""
    k, v = self.encoder_attn.project_kv(encoder_states)
    return encoder_states, (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))

  def __call__(self, x, cache, *, self_mask, cross_mask, index, encoder_states):
    """x float[B, U, D] -> float[B, U, D], and the carried cache.

    cache: None (a full forward: keys and values from x and encoder_states), or
    ((self_k, self_v, cross_k, cross_v), l): the stacked arrays of a `WhisperDecoderCache` and this
    layer's index; they come back with this layer's U new self-attention slots written at `index`."""
    h = self.self_attn_layer_norm(x)
    k, v = self.self_attn.project_kv(h)
    if cache is None:
      cross_k, cross_v = self.encoder_attn.project_kv(encoder_states)
    else:
      (self_k, self_v, cross_k, cross_v), layer = cache
      (self_k, self_v), (k, v) = write_kv_stacked(self_k, self_v, k, v, layer, index)  # [B, N, S, H]
      cache = (self_k, self_v, cross_k, cross_v)
      cross_k, cross_v = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in (cross_k, cross_v))
    cached = cache is not None
    x = x + self.self_attn(h, k, v, self_mask, heads_first=cached)
    x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), cross_k, cross_v, cross_mask, heads_first=cached)
    x = x + self.fc2(_gelu(self.fc1(self.final_layer_norm(x))))
    return constrain(x, ("batch", "length", "act_embed")), cache


class WhisperDecoder(nnx.Module):

  def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    emb = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, **emb,
                                  embedding_init=param_init(nnx.initializers.normal(0.02), ("vocab", "embed")))
    self.embed_positions = nnx.Embed(cfg.max_target_positions, cfg.d_model, **emb,
                                     embedding_init=param_init(nnx.initializers.normal(0.02), (None, "embed")))
    self.layers = LayerStack(lambda r: WhisperDecoderLayer(cfg, rngs=r), cfg.decoder_layers, rngs=rngs)
    self.layer_norm = _ln(cfg, rngs)

  def init_cache(self, encoder_states, encoder_frames, max_len: int) -> WhisperDecoderCache:
    """Empty self-attention cache for `max_len` tokens and the encoder's k, v for every layer."""
    cfg = self.cfg
    b, t, _ = encoder_states.shape
    _, (k, v) = self.layers(encoder_states, None, method="cross_kv", scan=cfg.scan_layers)
    self_kv = KVCache.zeros(cfg.decoder_layers, b, max_len, cfg.decoder_attention_heads,
                            cfg.d_model // cfg.decoder_attention_heads, cfg.dtype)
    return WhisperDecoderCache(self_kv, k, v, jnp.arange(t)[None, :] < encoder_frames[:, None])

  def __call__(
      self,
      input_ids: jax.Array,
      encoder_states: jax.Array | None = None,
      encoder_frames: jax.Array | None = None,
      *,
      attention_mask: jax.Array | None = None,
      cache: WhisperDecoderCache | None = None,
  ) -> tuple[jax.Array, WhisperDecoderCache | None]:
    """input_ids int[B, U] -> final hidden states float[B, U, D] (HF `last_hidden_state`).

    Without a cache, pass `encoder_states` float[B, T, D] (and `encoder_frames` int[B] if
    some frames are padding); with a cache (`init_cache`), positions continue from
    `cache.self_kv.index` and the updated cache comes back.
    """
    cfg = self.cfg
    b, u = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, u), bool)
    if cache is None:
      if encoder_states is None:
        raise UserError("the Whisper decoder needs encoder_states or a cache from init_cache")
      t = encoder_states.shape[1]
      if encoder_frames is None:
        encoder_frames = jnp.full((b,), t, jnp.int32)
      cross_valid = jnp.arange(t)[None, :] < encoder_frames[:, None]
      self_mask, carried, start = causal_mask(attention_mask), None, jnp.zeros((), jnp.int32)
    else:
      kv = cache.self_kv
      cross_valid = cache.encoder_mask
      self_mask, slot_mask = cached_mask(kv, attention_mask)
      carried, start = (kv.k, kv.v, cache.cross_k, cache.cross_v), kv.index
    # Rows at one position share one lookup of [U] positions; a per-row cache index needs [B, U]
    # (a batch-dependent gather, which XLA could not reshard on data x fsdp x tensor meshes).
    positions = start[:, None] + jnp.arange(u) if jnp.ndim(start) else (start + jnp.arange(u))[None]
    x = embed_lookup(self.embed_tokens, input_ids) * (math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0)
    x = x + self.embed_positions(positions).astype(x.dtype)
    x, carried = self.layers(
        constrain(x, ("batch", "length", "act_embed")), carried, scan=cfg.scan_layers,
        remat_policy=cfg.remat_policy, carry_per_layer=cache is not None, self_mask=self_mask,
        cross_mask=cross_valid[:, None, None, :], index=start, encoder_states=encoder_states)
    if cache is not None:
      cache = cache.replace(self_kv=KVCache(carried[0], carried[1], slot_mask, start + u))
    return self.layer_norm(x), cache


class WhisperModel(nnx.Module):
  """HF `WhisperModel`: `encoder` and `decoder`; `logits` ties the output to `embed_tokens`.

  `with_decoder=False` builds the encoder alone (LLaSM "encoder" mode never runs the decoder).
  """

  def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs, with_decoder: bool = True):
    self.cfg = cfg
    self.encoder = WhisperEncoder(cfg, rngs=rngs)
    if with_decoder:
      self.decoder = WhisperDecoder(cfg, rngs=rngs)

  def __call__(self, mel, decoder_input_ids, mel_lengths=None):
    """mel float[B, M, F], decoder_input_ids int[B, U] -> decoder states float[B, U, D]."""
    states, frames = self.encoder(mel, mel_lengths)
    return self.decoder(decoder_input_ids, states, frames)[0]

  def logits(self, decoder_states: jax.Array) -> jax.Array:
    """float[B, U, D] -> float32[B, U, V] (HF `proj_out`, tied to the token embeddings)."""
    return self.decoder.embed_tokens.attend(decoder_states).astype(jnp.float32)
