"""llasm_jax: LLaSM (Whisper + adaptor + LLaMA-family LLM) in JAX / Flax NNX."""

__version__ = "0.1.0"
