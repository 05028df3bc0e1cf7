"""Inference: KV-cache generation from text and speech, on one device or a mesh."""

from llasm_jax.infer.engine import AudioFeatures, Engine, EngineOutput, Timings, bucket
from llasm_jax.infer.sampling import SamplingParams, sample
