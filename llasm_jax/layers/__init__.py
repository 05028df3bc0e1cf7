"""Building blocks shared by the Whisper and LLaMA-family ports."""

from llasm_jax.layers.attention import KVCache, attend, causal_mask, cached_mask
from llasm_jax.layers.common import Buffer, RMSNorm, constrain, dense, dropout_rng, layer_norm, param_init
from llasm_jax.layers.lora import LoraConfig, LoraLinear, is_lora_path, lora_dense
from llasm_jax.layers.stack import LayerStack

__all__ = [
    "Buffer", "KVCache", "LayerStack", "LoraConfig", "LoraLinear", "RMSNorm", "attend", "cached_mask", "causal_mask",
    "constrain", "dense", "dropout_rng", "is_lora_path", "layer_norm", "lora_dense", "param_init",
]
