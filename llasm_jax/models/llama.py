"""LLaMA-family decoder LLM (LLaMA-1/2/3, Mistral, Qwen2, Baichuan-in-LLaMA-layout) in Flax NNX.

Legend: B batch, T query length, S key length, D hidden size, N query heads, K kv heads,
H head dim, F MLP hidden size, V vocab, Vp V padded to a multiple of vocab_multiple, L layers.

Submodule names follow Hugging Face `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`,
`...mlp.gate_proj`, `model.norm`, `lm_head`), so converting weights is a key map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llasm_jax.layers import KVCache, LayerStack, RMSNorm, attend, cached_mask, causal_mask, constrain, dense, param_init
from llasm_jax.layers.attention import write_kv_stacked
from llasm_jax.layers.common import embed_lookup
from llasm_jax.layers.lora import LoraConfig, lora_dense
from llasm_jax.errors import UserError

# The logit of a padded vocab column (LlamaConfig.vocab_multiple): its probability is exactly 0 in
# float32. Finite, unlike -inf, so that a KL between two padded distributions stays 0 * finite = 0.
MASKED_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """HF `rope_parameters` beyond rope_theta. rope_type: "default", "linear" or "llama3"."""

  rope_type: str = "default"  # "default": unscaled; "linear": every frequency / factor; "llama3": by wavelength
  factor: float = 1.0  # the context stretch: "linear" divides every frequency by it, "llama3" the low ones
  # "llama3": frequencies whose wavelength exceeds original_max_position_embeddings / low_freq_factor
  # are divided by factor.
  low_freq_factor: float = 1.0
  # "llama3": frequencies whose wavelength is below original_max_position_embeddings / high_freq_factor
  # stay; those between the two bounds blend smoothly.
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192  # "llama3": the context length of pretraining


# The projections that LoRA can adapt (LoraConfig.targets), with their paths in LlamaForCausalLM;
# config.train.lora.targets are regexes over "llm/" + these + "/kernel".
LORA_MODULES: dict[str, str] = {
    **{p: f"model/layers/layers/self_attn/{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{p: f"model/layers/layers/mlp/{p}" for p in ("gate_proj", "up_proj", "down_proj")},
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a LLaMA-family LLM; field names follow the HF `config.json`."""

  vocab_size: int = 32000  # V: rows of embed_tokens and columns of lm_head
  hidden_size: int = 4096  # D: the model width
  intermediate_size: int = 11008  # the MLP width (gate_proj, up_proj outputs)
  num_hidden_layers: int = 32  # decoder layers
  num_attention_heads: int = 32  # query heads
  num_key_value_heads: int = 32  # key/value heads (grouped-query attention when fewer than the query heads)
  head_dim: int | None = None  # None = hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
  rope_theta: float = 10000.0  # the RoPE base
  rope_scaling: RopeScaling = RopeScaling()  # RoPE frequency scaling for longer contexts
  max_position_embeddings: int = 4096  # the HF config's context length, kept for export; positions are not capped
  tie_word_embeddings: bool = False  # the LM head reuses embed_tokens (no lm_head weight)
  qkv_bias: bool = False  # Qwen2, or HF `attention_bias` (which also sets o_bias)
  o_bias: bool = False  # a bias on o_proj
  mlp_bias: bool = False  # biases on gate_proj, up_proj and down_proj
  # Low-rank adapters on the projections it targets (lora_a, lora_b next to their kernels), set by
  # config.train.lora and stored in the model folder; rank 0 = none.
  lora: LoraConfig = LoraConfig()
  bos_token_id: int = 1  # the HF config's; synthetic training rows start with it
  eos_token_id: int = 2  # generation stops at it (and at the other eos ids a model folder lists)
  pad_token_id: int | None = None  # generation's padding when the tokenizer has none; None = the eos id
  # How to run, not what is stored:
  dtype: str = "float32"  # compute dtype of activations and matmuls ("float32" or "bfloat16")
  param_dtype: str = "float32"  # dtype the weights are kept and updated in
  scan_layers: bool = True  # run the layers as one scan (compiles fast) or unrolled; the same numbers
  remat_policy: str = "none"  # recompute in the backward pass: none, full, dots, dots_no_batch, save_everything
  attention_impl: str | None = None  # None (XLA), "xla" or "cudnn"
  # The embedding rows and LM-head columns are padded to a multiple of this (1 = none), so that a
  # vocab such as 32003 shards over a tensor axis instead of being replicated; the padded logits are
  # masked (MASKED_LOGIT) and model folders keep the real vocab (checkpoint.py pads and strips).
  vocab_multiple: int = 1

  def __post_init__(self):
    if self.vocab_multiple < 1:
      raise UserError(f"vocab_multiple {self.vocab_multiple}: expected >= 1 (1 = no padding; e.g. 128)")
    if self.num_attention_heads % self.num_key_value_heads:
      raise UserError(
          f"num_attention_heads {self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads {self.num_key_value_heads}")
    if self.rope_scaling.rope_type not in ("default", "linear", "llama3"):
      raise UserError(
          f"rope_scaling.rope_type {self.rope_scaling.rope_type!r} is not supported; "
          "use 'default', 'linear' or 'llama3'")
    unknown = [t for t in self.lora.targets if t not in LORA_MODULES]
    if unknown:
      raise UserError(f"lora.targets {unknown}: not projections of the LLM; expected some of {list(LORA_MODULES)}")

  @property
  def kv_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def padded_vocab(self) -> int:
    """Vp: vocab_size rounded up to a multiple of vocab_multiple (rows of embed_tokens, columns of lm_head)."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama2_7b": LlamaConfig(),
    "chinese_llama2_7b_llasm": LlamaConfig(vocab_size=32003),
    "baichuan_7b_llasm": LlamaConfig(vocab_size=64004, rms_norm_eps=1e-6),
    "llama3_8b": LlamaConfig(
        vocab_size=128256, intermediate_size=14336, num_key_value_heads=8, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    # Meta-Llama-3.1-8B(-Instruct): eos 128001 is <|end_of_text|>; the Instruct folder's
    # generation_config.json adds <|eom_id|> 128008 and <|eot_id|> 128009, which generation reads from there.
    "llama3_1_8b": LlamaConfig(
        vocab_size=128256, intermediate_size=14336, num_key_value_heads=8, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001),
    # With LLaSM's three audio tokens appended (ids 128256-128258), as `llasm-jax convert` adds them.
    "llama3_1_8b_llasm": LlamaConfig(
        vocab_size=128259, intermediate_size=14336, num_key_value_heads=8, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001),
    # Qwen2.5-7B (base; -Instruct: eos <|im_end|> 151645, max_position_embeddings 32768). Its 152064
    # embedding rows exceed the tokenizer's 151665 tokens, so the audio tokens take ids 151665-151667
    # inside the vocab and it does not grow.
    "qwen2_5_7b": LlamaConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, qkv_bias=True,
        bos_token_id=151643, eos_token_id=151643),
    "llama_100m": LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
        num_attention_heads=12, num_key_value_heads=12),
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
  """float32[H/2] inverse frequencies, computed as HF `ROPE_INIT_FUNCTIONS` do."""
  dim = cfg.kv_head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  rs = cfg.rope_scaling
  if rs.rope_type == "linear":
    inv_freq = inv_freq / rs.factor
  elif rs.rope_type == "llama3":
    inv_freq = llama3_inv_freq(inv_freq, rs)
  return inv_freq


def llama3_inv_freq(inv_freq: jax.Array, rs: RopeScaling) -> jax.Array:
  """Llama 3 (3.1) RoPE scaling of inverse frequencies float32[H/2], as HF's "llama3" rope init:
  a frequency whose wavelength exceeds original_max_position_embeddings / low_freq_factor is
  divided by factor, one whose wavelength is below original_max_position_embeddings /
  high_freq_factor stays, and those between blend the two smoothly. The one owner of the rule
  (GGUF's per-frequency divisors are inv_freq / this)."""
  low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
  high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """positions int[B, T] -> cos, sin float[B, T, H] in the half-rotated (HF) layout."""
  freqs = positions[..., None].astype(jnp.float32) * rope_inv_freq(cfg)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x float[B, T, N, H]; rotates pairs (i, i + H/2) as HF `rotate_half` does."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class LlamaAttention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    lora = lambda name: cfg.lora if cfg.lora.applies_to(name) else None
    self.cfg = cfg
    self.q_proj = lora_dense(d, n * h, ("embed", "heads"), lora("q_proj"), use_bias=cfg.qkv_bias, **kw)
    self.k_proj = lora_dense(d, k * h, ("embed", "kv_heads"), lora("k_proj"), use_bias=cfg.qkv_bias, **kw)
    self.v_proj = lora_dense(d, k * h, ("embed", "kv_heads"), lora("v_proj"), use_bias=cfg.qkv_bias, **kw)
    self.o_proj = lora_dense(n * h, d, ("heads", "embed"), lora("o_proj"), use_bias=cfg.o_bias, **kw)

  def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None, prefix_kv=None):
    """x float[B, T, D] -> float[B, T, D], and the updated (k, v) cache of this layer.

    prefix_kv: this layer's keys and values float[B or 1, K, P, H] of P tokens before x, attended
    to as if they came first (a shared prompt prefix computed once; see LlamaModel)."""
    cfg = self.cfg
    b, t, _ = x.shape
    h = cfg.kv_head_dim
    q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, h)
    k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, h)
    v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, h)
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
    heads_first = cache_kv is not None
    if cache_kv is not None:
      (cache_k, cache_v), layer = cache_kv  # the whole stack and this layer's index
      cache_kv, (k, v) = write_kv_stacked(cache_k, cache_v, k, v, layer, cache_index)  # [B, K, S, H]
    if prefix_kv is not None:
      k, v = (jnp.concatenate([jnp.broadcast_to(p, (b, *p.shape[1:])).astype(x_.dtype), x_], axis=1)
              for p, x_ in zip((jnp.swapaxes(p, 1, 2) for p in prefix_kv), (k, v)))
    out = attend(q, k, v, mask, implementation=cfg.attention_impl, heads_first=heads_first)
    out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
    return self.o_proj(out.reshape(b, t, -1)), cache_kv


class LlamaMLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    lora = lambda name: cfg.lora if cfg.lora.applies_to(name) else None
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = lora_dense(d, f, ("embed", "mlp"), lora("gate_proj"), **kw)
    self.up_proj = lora_dense(d, f, ("embed", "mlp"), lora("up_proj"), **kw)
    self.down_proj = lora_dense(f, d, ("mlp", "embed"), lora("down_proj"), **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, ("batch", "length", "act_mlp")))


class LlamaDecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    norm = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.self_attn = LlamaAttention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.mlp = LlamaMLP(cfg, rngs=rngs)

  def __call__(self, x, cache_kv, *, cos, sin, mask, cache_index, prefix=False):
    """With `prefix`, `cache_kv` is this layer's prefix keys and values (read only; nothing returned)."""
    if prefix:
      attn, _ = self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix_kv=cache_kv)
      cache_kv = None
    else:
      attn, cache_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, cache_index)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, ("batch", "length", "act_embed")), cache_kv


class LlamaModel(nnx.Module):
  """The decoder stack without the LM head (HF `model.`)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(
        cfg.padded_vocab, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=param_init(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)
    self.layers = LayerStack(lambda r: LlamaDecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs=rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, inputs_embeds, positions, attention_mask, cache: KVCache | None, prefix_kv=None,
               segment_ids=None):
    """prefix_kv: (k, v) float[L, B or 1, K, P, H] of P tokens that come before these in every row
    (no padding), e.g. `KVCache.k, .v` of a prefill of a shared prompt prefix; no cache then.
    segment_ids int[B, T]: packed training rows (1..n per sample, 0 = padding), each sample
    attending to itself only (and to the prefix); no cache then."""
    cfg = self.cfg
    if segment_ids is not None and cache is not None:
      raise UserError("segment_ids are for packed training rows, which run without a KV cache")
    x = constrain(inputs_embeds.astype(cfg.dtype), ("batch", "length", "act_embed"))
    cos, sin = rope_cos_sin(cfg, positions, cfg.dtype)
    if prefix_kv is not None:
      if cache is not None:
        raise UserError("pass a KV cache or prefix keys and values, not both")
      b, t = attention_mask.shape
      seen = jnp.ones((b, 1, t, prefix_kv[0].shape[3]), bool)  # every prefix token, from every position
      mask = jnp.concatenate([seen, causal_mask(attention_mask, segment_ids)], axis=-1)
      x, _ = self.layers(x, tuple(prefix_kv), scan=cfg.scan_layers, remat_policy=cfg.remat_policy, cos=cos,
                         sin=sin, mask=mask, cache_index=None, prefix=True)
      return self.norm(x), None
    if cache is None:
      mask, per_layer, index = causal_mask(attention_mask, segment_ids), None, None
    else:
      mask, slot_mask = cached_mask(cache, attention_mask)
      per_layer, index = (cache.k, cache.v), cache.index
    # A cache of one buffer per layer (KVCache.unstack) is indexed by Python ints: layers unrolled.
    scan = cfg.scan_layers and not (cache is not None and cache.unstacked)
    x, new_kv = self.layers(
        x, per_layer, scan=scan, remat_policy=cfg.remat_policy, carry_per_layer=cache is not None,
        cos=cos, sin=sin, mask=mask, cache_index=index)
    if cache is not None:
      cache = KVCache(k=new_kv[0], v=new_kv[1], mask=slot_mask, index=cache.index + x.shape[1])
    return self.norm(x), cache


class LlamaForCausalLM(nnx.Module):
  """HF `LlamaForCausalLM`: `model` (embeddings, layers, final norm) and `lm_head`."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.model = LlamaModel(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = dense(cfg.hidden_size, cfg.padded_vocab, ("embed", "vocab"), use_bias=False,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """int[B, T] -> float[B, T, D]."""
    return embed_lookup(self.model.embed_tokens, input_ids)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float[B, T, D] -> float32[B, T, Vp] (Vp = cfg.padded_vocab): the columns from vocab_size on,
    which no token has, hold MASKED_LOGIT, so that no softmax, loss or sampler gives them weight."""
    cfg = self.cfg
    if cfg.tie_word_embeddings:
      out = self.model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    out = constrain(out, ("batch", "length", "act_vocab")).astype(jnp.float32)
    if cfg.padded_vocab != cfg.vocab_size:
      out = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, out, MASKED_LOGIT)
    return out

  def __call__(
      self,
      input_ids: jax.Array | None = None,
      *,
      inputs_embeds: jax.Array | None = None,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      cache: KVCache | None = None,
      prefix_kv: tuple[jax.Array, jax.Array] | None = None,
      segment_ids: jax.Array | None = None,
      return_hidden: bool = False,
  ) -> tuple[jax.Array, KVCache | None]:
    """Logits float32[B, T, Vp] (see `logits`; or final hidden states float[B, T, D]) and the updated cache.

    attention_mask int/bool[B, T]: 1 for real tokens, 0 for padding (keys only).
    positions int[B, T]: RoPE positions; default 0..T-1 (or continuing from the cache).
    segment_ids int[B, T]: packed rows, 1..n per sample and 0 for padding; attention stays inside
    each sample (pass positions that restart per sample). None: one sequence per row.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise UserError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    b, t = inputs_embeds.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    if positions is None:
      start = 0 if cache is None else cache.index[..., None] if cache.per_row else cache.index
      positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    hidden, cache = self.model(inputs_embeds, positions, attention_mask, cache, prefix_kv, segment_ids)
    return (hidden if return_hidden else self.logits(hidden)), cache

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    cfg = self.cfg
    return KVCache.zeros(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads,
                         cfg.kv_head_dim, dtype or cfg.dtype)
