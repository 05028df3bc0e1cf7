"""Hugging Face `config.json` dicts <-> llasm_jax model configs."""

from __future__ import annotations

import dataclasses
from typing import Any

from llasm_jax.models.llama import LlamaConfig, RopeScaling
from llasm_jax.models.whisper import WhisperConfig
from llasm_jax.errors import UserError

# Architectures whose checkpoints load into the LLaMA port. Baichuan-7B and the LLaSM
# checkpoints are stored in LLaMA layout under their own names.
LLAMA_FAMILY = {"llama": "LLaMA-1/2/3", "mistral": "Mistral (no sliding window)", "qwen2": "Qwen2",
                "llaaa": "LLaSM (released checkpoints)", "baichuan": "Baichuan-7B in LLaMA layout"}


def llama_config_from_hf(hf: dict[str, Any], **run) -> LlamaConfig:
  """`run` sets the run-time fields (dtype, scan_layers, ...)."""
  model_type = hf.get("model_type", "llama")
  if model_type not in LLAMA_FAMILY:
    raise UserError(f"model_type {model_type!r} is not supported; supported: "
                     + ", ".join(f"{k} ({v})" for k, v in LLAMA_FAMILY.items()))
  if model_type == "mistral" and hf.get("sliding_window") not in (None, 0) \
      and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
    raise UserError(f"sliding_window={hf['sliding_window']} attention is not supported")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  fields = {f.name for f in dataclasses.fields(RopeScaling)}
  scaling = RopeScaling(rope_type=rope_type, **{k: v for k, v in rope.items() if k in fields})
  heads = hf["num_attention_heads"]
  attention_bias = bool(hf.get("attention_bias", False))
  eos = hf.get("eos_token_id", 2)
  return LlamaConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_hidden_layers=hf["num_hidden_layers"],
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim"),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope_theta),
      rope_scaling=scaling,
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=attention_bias or model_type == "qwen2",
      o_bias=attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      bos_token_id=hf.get("bos_token_id", 1),
      eos_token_id=eos[0] if isinstance(eos, list) else eos,
      pad_token_id=hf.get("pad_token_id"),
      **run,
  )


def llama_config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
  """A `LlamaForCausalLM` config.json dict (qkv-only bias becomes a Qwen2 config)."""
  if cfg.qkv_bias and not cfg.o_bias:
    model_type, arch = "qwen2", "Qwen2ForCausalLM"
  else:
    model_type, arch = "llama", "LlamaForCausalLM"
  rope = {"rope_type": cfg.rope_scaling.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling.rope_type != "default":
    rope.update(dataclasses.asdict(cfg.rope_scaling))
  out = dict(
      architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.kv_head_dim,
      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_parameters=rope,
      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
      mlp_bias=cfg.mlp_bias, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
      pad_token_id=cfg.pad_token_id, hidden_act="silu")
  if model_type == "llama":
    out["attention_bias"] = cfg.o_bias
  return out


_WHISPER_FIELDS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                   "decoder_layers", "decoder_attention_heads", "decoder_ffn_dim", "vocab_size",
                   "max_source_positions", "max_target_positions", "scale_embedding", "decoder_start_token_id")


def whisper_config_from_hf(hf: dict[str, Any], **run) -> WhisperConfig:
  if hf.get("model_type") != "whisper":
    raise UserError(f"model_type {hf.get('model_type')!r} is not a Whisper checkpoint (expected 'whisper')")
  if hf.get("activation_function", "gelu") != "gelu":
    raise UserError(f"Whisper activation_function {hf['activation_function']!r} is not supported (only 'gelu')")
  return WhisperConfig(**{k: hf[k] for k in _WHISPER_FIELDS if k in hf}, **run)


def whisper_config_to_hf(cfg: WhisperConfig) -> dict[str, Any]:
  return dict(architectures=["WhisperForConditionalGeneration"], model_type="whisper",
              activation_function="gelu", **{k: getattr(cfg, k) for k in _WHISPER_FIELDS})
