"""`llasm-jax serve`: an OpenAI-compatible speech chat server with continuous batching."""
