"""Weight conversion between Hugging Face PyTorch checkpoints and llasm_jax parameters."""
