"""Packaging for llasm_jax: `pip install -e '.[test]'` gives the library, the `llasm-jax` CLI and the test tools."""

from setuptools import find_packages, setup

TORCH = "torch==2.13.0"  # CPU build is enough: the PyTorch reference in tests and reading .bin checkpoints

setup(
    name="llasm_jax",
    version="0.1.0",
    description="LLaSM (Whisper speech encoder + adaptor + LLaMA-family LLM) in JAX / Flax NNX",
    packages=find_packages(include=["llasm_jax", "llasm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "numpy",
        "transformers>=5",
        "tokenizers",
        "sentencepiece",
        "protobuf",
        "safetensors",
        "soundfile",
        "librosa",
        "soxr",
        "tqdm",
        "tensorboardX",
        "grain",
        "array-record",
        "tensorflow-datasets",
    ],
    extras_require={
        "torch": [TORCH],
        "test": ["pytest", "pytest-xdist", TORCH],
    },
    entry_points={"console_scripts": ["llasm-jax=llasm_jax.cli:main"]},
)
