"""Command line entry point `llasm-jax` (also `python -m llasm_jax.cli`): thin argparse over the package."""

# The flags are declared here (`llasm-jax data`'s in data.py, shared ones in flags.py); what each command
# runs is in commands.py.

from __future__ import annotations

import argparse
import os
import sys

import jax

from llasm_jax.cli import data
from llasm_jax.cli.commands import (DEFAULT_CONFIG, chat, convert, demo, evaluate, export, forward, generate, serve,
                                    train)
from llasm_jax.cli.flags import DTYPES, LOAD, add_flags, dataclass_flags
from llasm_jax.errors import UserError
from llasm_jax.models.llasm import MODES


def maybe_initialize_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize() when flags or the launch environment ask for several processes.

  TPU pods and SLURM are detected by JAX itself from their environment; explicit flags serve
  other clusters and local multi-process runs (e.g. two processes on 127.0.0.1).
  """
  if args.coordinator:
    if args.num_processes is None or args.process_id is None:
      raise SystemExit("--coordinator needs --num-processes and --process-id")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="llasm-jax", description=__doc__)
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host TPU pods, SLURM); "
                           "also done automatically inside a multi-task SLURM job")
  parser.add_argument("--coordinator", help="host:port of process 0, for jax.distributed.initialize")
  parser.add_argument("--num-processes", type=int, help="with --coordinator: number of processes")
  parser.add_argument("--process-id", type=int, help="with --coordinator: this process's index")
  sub = parser.add_subparsers(dest="command", required=True)

  from llasm_jax.demo import Options

  p = sub.add_parser("demo", help="the LLaSM recipe for real: pretrained Whisper + instruct LLM, spoken data, "
                                  "adaptor training, held-out WER and answers beside Whisper's own (resumable)")
  dataclass_flags(p, Options)
  p.set_defaults(func=demo)

  p = sub.add_parser("forward", help="random-weight forward pass on synthetic speech: shapes and timings")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="ml_collections config file (default: %(default)s)")
  p.add_argument("--seconds", type=float, default=5.0, help="audio length per sample")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--text-tokens", type=int, default=8, help="random text tokens on each side of the audio")
  p.add_argument("--repeats", type=int, default=3, help="timed forward calls after the first")
  add_flags(p, "mesh", mesh="override config.mesh.shape, e.g. data=2,fsdp=2,tensor=2")
  p.set_defaults(func=forward)

  p = sub.add_parser("train", help="LLaSM stage 1 / stage 2 training (resumes from --workdir)")
  p.add_argument("--config", default="configs/tiny.py:stage1",
                 help="ml_collections config file (default: %(default)s, a tiny model on synthetic data)")
  p.add_argument("--workdir", default=None,
                 help="checkpoints, logs, TensorBoard events, the final model/ (default: workdir/<config name>)")
  p.add_argument("--compile-only", action="store_true",
                 help="compile the train step for the config's mesh and print per-device memory, then exit "
                      "(nothing is allocated: check a 7B config fits before it reaches the hardware)")
  p.add_argument("--topology", metavar="NAME",
                 help="compile for this TPU slice with libtpu on any host (implies --compile-only), e.g. v5e:16x16, "
                      "v6e:8x8, v5p:4x4x2 (32 chips, 'v5p-64'), v4:2x2x2: per-chip HBM against the chip's, "
                      "fit or not (exit status 2), model FLOPs and step-time estimates")
  p.add_argument("--search", nargs="?", const="", metavar="POLICIES",
                 help="with --topology: the largest per-chip batch that fits for each LLM remat policy "
                      "(default all; or a comma list such as full,dots), by doubling then bisection")
  p.add_argument("--max-batch", type=int, default=256, metavar="N",
                 help="--search tries per-chip batches up to N (default: %(default)s)")
  p.add_argument("--json", metavar="FILE", help="with --topology: also write the result as JSON")
  p.set_defaults(func=train)

  p = sub.add_parser("convert", help="Hugging Face / CTranslate2 / GGUF checkpoints -> a llasm_jax model folder")
  p.add_argument("--llm", help="LLaMA-family LLM: a Hugging Face folder, a released LLaSM checkpoint (model_type "
                               "llaaa), or a GGUF file (llama.cpp; or a folder holding one .gguf)")
  p.add_argument("--whisper", help="Whisper: a Hugging Face folder (e.g. openai/whisper-large-v2) or a CTranslate2 "
                                   "folder (model.bin, as faster-whisper uses)")
  add_flags(p, "out")
  p.add_argument("--dtype", choices=DTYPES, default="float32", help="stored dtype")
  p.add_argument("--mode", choices=MODES, default="llasm",
                 help="audio path of a new LLaSM model (--llm BASE --whisper W): llasm (the released one: Whisper's "
                      "decoder over 64 start tokens), encoder (Whisper's encoder frames, stacked), decoder (Whisper's "
                      "decoder states along its own greedy transcript, each beside the LLM's embedding of its token)")
  # No argparse choices: convert() names the choices in its UserError, for CLI and Python alike.
  p.add_argument("--adaptor", metavar="{mlp,ultravox}",
                 help="--mode encoder: the new model's projector, mlp (stacked frames, Linear-GELU-Linear; the "
                      "default) or ultravox (RMSNorm-Linear-SwiGLU-Linear-RMSNorm, output scale = the LLM's "
                      "embedding RMS); a released folder keeps the one it records")
  p.add_argument("--stack-factor", type=int, help="--mode encoder: encoder frames per audio token of a new model "
                                                  "(default 8: 6.25 tokens per second of audio)")
  p.add_argument("--adaptor-hidden", type=int, help="--mode encoder: a new model's adaptor inner width (default: "
                                                    "the LLM's hidden size)")
  p.add_argument("--audio-tokens", type=int, help="--mode decoder: a new model's transcript tokens per audio window, "
                                                  "<|endoftext|> included (default 64, about 20 s of speech)")
  add_flags(p, "overwrite")
  p.set_defaults(func=convert)

  p = sub.add_parser("export", help="a llasm_jax model folder -> Hugging Face folders (llm/, whisper/, llasm/; "
                                    "a PEFT adapter in lora/ for a LoRA model)")
  add_flags(p, "ckpt", "out")
  p.add_argument("--shard-gb", type=float, default=4.0, help="safetensors shard size in GiB")
  add_flags(p, "overwrite")
  p.add_argument("--lora", choices=("peft", "merge"), default="peft",
                 help="a LoRA model's factors: a PEFT adapter in OUT/lora/ beside the base OUT/llm/ (default), "
                      "or merged into OUT/llm/")
  p.add_argument("--merge-lora", dest="lora", action="store_const", const="merge", help="the same as --lora merge")
  p.set_defaults(func=export)

  for name, help_text in (("generate", "reply to one prompt: text, audio files, or both"),
                          ("chat", "interactive multi-turn chat; a line naming an audio file sends it")):
    p = sub.add_parser(name, help=help_text)
    add_flags(p, "ckpt")
    if name == "generate":
      p.add_argument("--prompt", default="", help="the user's text (audio goes before it unless it holds <audio>)")
      p.add_argument("--audio", action="append", help="audio file (wav, flac, ogg, mp3, ...); repeat for several")
      p.add_argument("--json", action="store_true",
                     help="print one JSON object: text, token_ids, prompt_token_ids, finish_reason, timings")
    add_flags(p, "template", "system")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the released demo uses 0.2)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (not printed); repeat for several")
    add_flags(p, *LOAD)
    p.set_defaults(func=generate if name == "generate" else chat)

  p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions with input_audio, "
                                   "/v1/audio/transcriptions, /v1/models): continuous batching over decode slots")
  add_flags(p, "ckpt", ckpt="llasm_jax model folder (from convert or train), local or gs://")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only; "
                                                      "0.0.0.0 serves the network)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
  p.add_argument("--slots", type=int, default=8, help="requests decoded together (default: %(default)s)")
  p.add_argument("--max-len", type=int, default=2048, help="tokens per slot, prompt + reply (default: %(default)s)")
  p.add_argument("--chunk", type=int, default=4, help="decode steps between two scheduling rounds (default: %(default)s)")
  p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default: %(default)s)")
  p.add_argument("--default-max-tokens", type=int, default=512, help="reply length when a request names none")
  p.add_argument("--max-audio-mb", type=float, default=25.0, help="largest audio per part or file (default: %(default)s)")
  add_flags(p, "template", "system", *LOAD,
         template="prompt template (default: the folder's, else the tokenizer's chat template, else llasm-cllama2 / "
                  "none)",
         system="system prompt when a request sends none (default: the template's own)",
         mesh="shard on this mesh, e.g. data=2,tensor=4 (DEFAULT_RULES)")
  p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
  p.set_defaults(func=serve)

  p = sub.add_parser("eval", help="greedy answers over a built dataset, scored: WER / CER (asr rows), answer F1 "
                                  "(instructions); a Whisper folder transcribes (the baseline)")
  add_flags(p, "ckpt", ckpt="llasm_jax model folder: a LLaSM, or a Whisper (asr datasets)")
  p.add_argument("--data", required=True, help="dataset folder(s) of `llasm-jax data build` or `data encode`")
  p.add_argument("--limit", type=int, help="evaluate the first N rows (default: all)")
  p.add_argument("--batch", type=int, default=8, help="rows per generate call (default: %(default)s)")
  p.add_argument("--max-new-tokens", type=int, default=128, help="per answer (default: %(default)s)")
  p.add_argument("--out", help="write the JSON report here (per-row answers and scores, totals, timings)")
  p.add_argument("--worst", type=int, default=5, help="rows of each metric to print, worst first")
  add_flags(p, "template", "system",
         template="prompt template training used (default: the one the model folder records, else chat-template "
                  "if the tokenizer has one, else llasm-cllama2)",
         system="system prompt training used (default: the folder's record, else the template's own; '' = none)")
  p.add_argument("--mel-frames", type=int, help="'encoder' mode: the audio window training used, in mel frames "
                                                "(default: 3000, or the cached dataset's)")
  add_flags(p, *LOAD, mesh="shard on this mesh, e.g. data=2,tensor=4 (DEFAULT_RULES)")
  p.set_defaults(func=evaluate)

  data.add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  args, rest = build_parser().parse_known_args(argv)
  if args.command == "train":
    args.overrides = rest  # --config.train.steps=100 style
  elif rest:
    build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
  maybe_initialize_distributed(args)
  if args.command != "train":  # train keeps its cache in the workdir (config.train.compilation_cache)
    from llasm_jax import compilation_cache

    compilation_cache.enable(compilation_cache.default_folder())
  try:
    args.func(args)
  except (UserError, FileExistsError, FileNotFoundError) as e:
    # Input errors already name the file and the fix; a traceback would bury that. Anything else
    # (an internal JAX error, a bug) keeps its traceback.
    print(f"llasm-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0
