"""Training data for llasm_jax: audio decoding, Whisper features, conversation templates, TFDS builders, grain pipeline."""
