"""Cached Whisper features (`llasm-jax data encode`): the marker a cache carries, its check against a model, and
what a dataset's batches carry of the audio ("mel" or "cached")."""

from __future__ import annotations

from typing import Any

from llasm_jax.data.contract import FEATURES
from llasm_jax.errors import UserError
from llasm_jax.models.llasm import LlasmConfig

CACHE_FORMAT = 1
CACHE_PROVENANCE = ("checkpoint", "source")  # where a cache's marker says it came from, not what it holds


def features_identity(marker: dict[str, Any] | None) -> dict[str, Any] | None:
  """What a cache's features are (mode, windows, dtype, Whisper), its provenance left out: caches
  of different datasets by the same Whisper train together."""
  return None if marker is None else {k: v for k, v in marker.items() if k not in CACHE_PROVENANCE}


def cache_marker(cfg: LlasmConfig, *, mel_frames: int, dtype: str, whisper_fingerprint: str,
                 **info) -> dict[str, Any]:
  """What made a cache, as `data encode` stores it: everything the features depend on."""
  w = cfg.audio
  marker = {"format": CACHE_FORMAT, "mode": cfg.mode, "num_mel_bins": w.num_mel_bins, "feature_dim": cfg.feature_dim,
            "mel_frames": cfg.geometry(mel_frames).frames, "dtype": dtype,
            "whisper": {"fingerprint": whisper_fingerprint, "d_model": w.d_model,
                        "encoder_layers": w.encoder_layers, "compute_dtype": w.dtype}}
  marker.update(_decoder_facts(cfg))
  if cfg.with_decoder:
    marker["whisper"]["decoder_layers"] = w.decoder_layers
  return {**marker, **info}


def _decoder_facts(cfg: LlasmConfig) -> dict[str, Any]:
  """What the features of the modes that run Whisper's decoder depend on besides its weights."""
  if cfg.mode == "llasm":
    return dict(audio_token_len=cfg.audio_token_len, decoder_start_token_id=cfg.audio.decoder_start_token_id)
  if cfg.mode == "decoder":
    return dict(audio_token_len=cfg.audio_token_len, decoder_prompt=list(cfg.decoder_prompt),
                decoder_suppress=list(cfg.decoder_suppress), decoder_begin_suppress=list(cfg.decoder_begin_suppress))
  return {}


def check_cache(marker: dict[str, Any], cfg: LlasmConfig, *, mel_frames: int, whisper_fingerprint: str | None = None,
                where: str = "the cached dataset") -> None:
  """Raises if the features of `marker` are not what the model `cfg` (with `mel_frames` windows,
  and Whisper weights of `whisper_fingerprint`, when given) would compute itself."""
  fix = ("encode the raw dataset again with the model you train: "
         "llasm-jax data encode --ckpt MODEL --data RAW_DATASET --out DIR")
  if marker.get("format") != CACHE_FORMAT:
    raise UserError(f"{where}: cache format {marker.get('format')}, this llasm_jax reads format {CACHE_FORMAT}; {fix}")
  if marker["mode"] != cfg.mode:
    raise UserError(f"{where}: features cached in {marker['mode']!r} mode, but the model runs in {cfg.mode!r} "
                     f"mode; {fix}")
  facts = {"num_mel_bins": cfg.audio.num_mel_bins, "feature_dim": cfg.feature_dim, **_decoder_facts(cfg)}
  for key, want in facts.items():
    if marker.get(key) != want:
      raise UserError(f"{where}: features cached with {key}={marker.get(key)}, the model has {key}={want} "
                       f"(another Whisper); {fix}")
  if not cfg.padded_mel and marker["mel_frames"] != mel_frames:
    raise UserError(f"{where}: features cached in {marker['mel_frames']}-frame windows but config.data.mel_frames "
                     f"is {mel_frames}; set --config.data.mel_frames={marker['mel_frames']}, or encode again with "
                     f"--mel-frames {mel_frames}")
  if whisper_fingerprint is not None and marker["whisper"]["fingerprint"] != whisper_fingerprint:
    raise UserError(f"{where}: features cached by another Whisper (weights {marker['whisper']['fingerprint']}, "
                     f"the model's {whisper_fingerprint}); {fix}")


def resolve_features(features: str, source) -> str:
  """config.data.features ("auto", "mel" or "cached") -> what `source` can give ("mel" or "cached")."""
  cached = getattr(source, "cache", None) is not None
  if features == "auto":
    return "cached" if cached else "mel"
  if features not in FEATURES:
    raise UserError(f"config.data.features {features!r}: expected 'auto', 'mel' or 'cached'")
  if features == "cached" and not cached:
    raise UserError(f"config.data.features is 'cached' but {source} holds raw audio; cache its Whisper outputs "
                     "first (llasm-jax data encode --ckpt MODEL --data RAW --out DIR) and train on DIR")
  if features == "mel" and cached:
    raise UserError(f"config.data.features is 'mel' but {source} holds cached Whisper features and no audio; "
                     "set config.data.features to 'cached' (or 'auto'), or train on the raw dataset")
  return features
