"""Inference: KV-cache generation from text and speech, on one device or a mesh."""

from llasm_jax.infer.audio_embed import AudioFeatures
from llasm_jax.infer.engine import Engine, EngineOutput, Timings
from llasm_jax.infer.mesh import bucket
from llasm_jax.infer.sampling import SamplingParams, sample
