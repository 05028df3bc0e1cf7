"""Building blocks shared by the Whisper and LLaMA-family ports."""

from llasm_jax.layers.attention import KVCache, attend, causal_mask, cached_mask
from llasm_jax.layers.common import Buffer, RMSNorm, constrain, dense, layer_norm, param_init
from llasm_jax.layers.stack import LayerStack

__all__ = [
    "Buffer", "KVCache", "LayerStack", "RMSNorm", "attend", "cached_mask", "causal_mask",
    "constrain", "dense", "layer_norm", "param_init",
]
