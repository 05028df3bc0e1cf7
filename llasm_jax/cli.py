"""Command line entry point `llasm-jax` (also `python -m llasm_jax.cli`): thin argparse over the package."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time as time_module

import jax

from llasm_jax import sharding
from llasm_jax.config import load_config_file
from llasm_jax.errors import UserError
from llasm_jax.quantize import QUANTIZE_HELP, QUANTIZE_MODES
from llasm_jax.models.llasm import MODES

DEFAULT_CONFIG = "configs/tiny.py"


def _find_config(path: str) -> pathlib.Path:
  """`path` as given, else relative to the repository checkout (so `llasm-jax forward` works anywhere)."""
  p = pathlib.Path(path)
  if p.is_file() or p.is_absolute():
    return p
  repo = pathlib.Path(__file__).resolve().parent.parent
  return repo / p if (repo / p).is_file() else p


def _parse_mesh(text: str) -> dict[str, int]:
  """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}."""
  try:
    return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected axis=size pairs such as data=2,fsdp=2,tensor=2")


def _parse_snr(text: str) -> tuple[float, float]:
  """"5,20" -> (5.0, 20.0); "10" -> (10.0, 10.0)."""
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) not in (1, 2):
    raise argparse.ArgumentTypeError(f"--snr {text!r}: expected LO,HI in dB such as 5,20 (or one value)")
  lo, hi = values[0], values[-1]
  if lo > hi:
    raise argparse.ArgumentTypeError(f"--snr {text!r}: LO above HI; give the range low first, e.g. 5,20")
  return lo, hi


def forward(args: argparse.Namespace) -> None:
  from llasm_jax.infer.forward import run_forward

  run_forward(load_config_file(_find_config(args.config)), config_name=args.config, batch=args.batch,
              seconds=args.seconds, text_tokens=args.text_tokens, repeats=args.repeats, mesh_shape=args.mesh)


def _flag(text: str) -> bool:
  if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
  return text.lower() in ("true", "1", "yes")


def demo(args: argparse.Namespace) -> None:
  from llasm_jax.demo import Options, run_demo

  run_demo(Options(**{k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__ and v is not None}))


def train(args: argparse.Namespace) -> None:
  from llasm_jax.config import apply_overrides
  from llasm_jax.train import trainer

  config = load_config_file(_find_config(args.config))
  apply_overrides(config, args.overrides)
  if args.search is not None and not args.topology:
    raise UserError("--search needs --topology (a TPU slice such as v5p:4x4x4): only libtpu knows the HBM limit")
  if args.topology:  # compile-only for a TPU slice this host need not have
    import json

    from llasm_jax.train import plan

    name = pathlib.Path(args.config).name
    if args.search is not None:
      policies = [p.strip() for p in args.search.split(",") if p.strip()]
      result = plan.search(config, args.topology, policies=policies, max_per_chip=args.max_batch, name=name)
    else:
      result = plan.plan(config, args.topology, name=name)
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
      print(f"written to {args.json}")
    if args.search is None and not result["fits"]:
      raise UserError(plan.no_fit_error(result))  # exit status 2, as every input error
    return
  if args.compile_only:
    trainer.compile_only(config)
    return
  trainer.train(config, args.workdir or os.path.join("workdir", pathlib.Path(args.config).stem))


def convert(args: argparse.Namespace) -> None:
  from llasm_jax.convert.convert import convert as run

  print(run(args.llm, args.whisper, out=args.out, dtype=args.dtype, mode=args.mode, adaptor=args.adaptor,
            stack_factor=args.stack_factor, adaptor_hidden=args.adaptor_hidden, overwrite=args.overwrite))


def export(args: argparse.Namespace) -> None:
  from llasm_jax.convert.export import export as run

  written = run(args.ckpt, args.out, shard_bytes=int(args.shard_gb * 2**30), overwrite=args.overwrite, lora=args.lora)
  for folder, nbytes in written.items():
    print(f"wrote {args.out}/{folder} ({nbytes / 2**20:.1f} MiB)")


AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".webm")


def _mesh_and_rules(args: argparse.Namespace):
  """(mesh, rules) of --config / --mesh, or (None, None): one device."""
  from llasm_jax.sharding import DEFAULT_RULES

  if not (args.config or args.mesh):
    return None, None
  run_cfg = load_config_file(_find_config(args.config)) if args.config else None
  rules = tuple(tuple(r) for r in run_cfg.logical_axis_rules) if run_cfg else DEFAULT_RULES
  return sharding.make_mesh(args.mesh or run_cfg.mesh.shape), rules


def _generator(args: argparse.Namespace):
  """Loads --ckpt once: on one device, or sharded on the mesh of --config / --mesh."""
  from llasm_jax.infer.generator import Generator

  mesh, rules = _mesh_and_rules(args)
  run = {"dtype": args.dtype} if args.dtype else {}
  return Generator.load(args.ckpt, mesh=mesh, rules=rules, template=args.template,
                        system=getattr(args, "system", None), quantize=getattr(args, "quantize", "none"), **run)


def _generate_kw(args: argparse.Namespace) -> dict:
  return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop=args.stop or ())


def _print_piece(row: int, text: str) -> None:
  print(text, end="", flush=True)


def generate(args: argparse.Namespace) -> None:
  import json

  if not args.prompt and not args.audio:
    raise UserError("nothing to reply to: pass --prompt TEXT, --audio FILE, or both")
  gen = _generator(args)
  # Token by token to a terminal; a pipe gets the whole reply (or --json) at the end.
  stream = _print_piece if not args.json and sys.stdout.isatty() else None
  [res] = gen.generate([args.prompt or ""], [args.audio or []], stream=stream, **_generate_kw(args))
  if args.json:
    print(json.dumps(res.as_dict(), ensure_ascii=False))
  else:
    print("" if stream else res.text)


def evaluate(args: argparse.Namespace) -> None:
  from llasm_jax.infer.evaluate import evaluate as run

  mesh, rules = _mesh_and_rules(args)
  run_options = {"dtype": args.dtype} if args.dtype else {}
  if args.quantize != "none":  # the LLM's kernels; a Whisper folder (transcription) has no LLM
    from llasm_jax import checkpoint

    if checkpoint.read_meta(args.ckpt)["kind"] == "whisper":
      raise UserError(f"--quantize {args.quantize} applies to a LLaSM's LLM; --ckpt {args.ckpt!r} is a Whisper, "
                       "which transcribes in float: drop --quantize")
    run_options["quantize"] = args.quantize
  report = run(args.ckpt, args.data, limit=args.limit, batch=args.batch, max_new_tokens=args.max_new_tokens,
               mesh=mesh, rules=rules, template=args.template, system=args.system, mel_frames=args.mel_frames,
               **run_options)
  if jax.process_index() == 0:
    print(report.table(worst=args.worst))
    print(report.summary())
    if args.out:
      report.write(args.out)
      print(f"report written to {args.out}")


def _audio_line(line: str) -> tuple[str | None, str]:
  """A chat line -> (audio path or None, text): the line, or its first word, names an audio file."""
  if os.path.isfile(line.strip("'\"")) or line.lower().endswith(AUDIO_EXTENSIONS):
    return line.strip("'\""), ""
  first, _, rest = line.partition(" ")
  if os.path.isfile(first) or first.lower().endswith(AUDIO_EXTENSIONS):
    return first, rest.strip()
  return None, line


def chat(args: argparse.Namespace) -> None:
  from llasm_jax.infer.generator import Chat

  session = Chat(_generator(args), template=args.template)
  tty = sys.stdin.isatty()
  print("chat: type a message, or an audio file path (optionally followed by text) to send that audio; "
        "/reset starts over, /quit or Ctrl-D ends", file=sys.stderr)
  while True:
    if tty:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() in ("/quit", "/exit"):
      break
    line = line.strip()
    if not line:
      continue
    if line == "/reset":
      session.reset()
      continue
    audio, text = _audio_line(line)
    try:
      session.send(text, audio, stream=_print_piece, **_generate_kw(args))
      print(flush=True)
    except ValueError as e:  # a bad file or input: say so and keep the conversation going
      print(f"error: {e}", file=sys.stderr, flush=True)


def serve(args: argparse.Namespace) -> None:
  import uvicorn

  from llasm_jax.serve.app import create_app
  from llasm_jax.serve.scheduler import Scheduler

  generator = _generator(args)
  scheduler = Scheduler(generator, slots=args.slots, max_len=args.max_len, chunk=args.chunk, max_queue=args.max_queue)
  name = args.model_name or os.path.basename(os.path.normpath(args.ckpt))
  t0 = time_module.perf_counter()
  scheduler.warmup()
  print(f"llasm-jax serve: {name} ({'LLaSM' if generator.cfg is not None else 'text-only LLM'}, template "
        f"{generator.template_name}), {args.slots} slots x {args.max_len} tokens, compiled in "
        f"{time_module.perf_counter() - t0:.1f} s; OpenAI API at http://{args.host}:{args.port}/v1", flush=True)
  app = create_app(scheduler, model_name=name, max_audio_bytes=int(args.max_audio_mb * 2**20),
                   default_max_tokens=args.default_max_tokens)
  uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


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


def data_build(args: argparse.Namespace) -> None:
  from llasm_jax.data import builders

  if args.max_text_tokens and not args.tokenizer:
    raise UserError("--max-text-tokens needs --tokenizer (a tokenizer folder or hub name) to count tokens")
  options = builders.Options(
      min_seconds=args.min_seconds, max_seconds=args.max_seconds or None, silence_peak=args.silence_peak,
      max_text_chars=args.max_text_chars, max_text_tokens=args.max_text_tokens, tokenizer=args.tokenizer)
  if args.kind == "asr":
    rows = builders.asr_rows(args.manifest, args.librispeech, args.aishell, args.audio_root, args.language)
  else:
    rows = builders.instruction_rows(args.json, args.audio_root)
  result = builders.build(args.kind, rows, args.out, options=options, workers=args.workers,
                          max_skip_share=args.max_skip_share, overwrite=args.overwrite)
  print(builders.summary(result))


def data_encode(args: argparse.Namespace) -> None:
  from llasm_jax.data import encode

  result = encode.encode(args.ckpt, args.data, args.out, dtype=args.dtype, batch_size=args.batch,
                         mel_frames=args.mel_frames, mesh_shape=args.mesh, overwrite=args.overwrite)
  if jax.process_index() == 0:
    print(encode.summary(result))


def data_synth(args: argparse.Namespace) -> None:
  from llasm_jax.data import synth, textsource

  if args.limit is not None and args.limit < 1:
    raise UserError(f"--limit {args.limit}: expected a positive number of rows")
  options = synth.Options(engine=args.engine, seed=args.seed, max_seconds=args.max_seconds or None,
                          reverb=args.reverb, reverb_p=args.reverb_p, snr_db=args.snr, noise_p=args.noise_p)
  if args.text:
    plan = synth.plan_text(args.text, args.format, args.language, args.limit)
  else:
    plan = synth.plan_instructions(args.instructions, args.format, args.language, args.limit)
  # Read before synthesis so that a bad --held-out file fails at once, printed after the summary.
  held_out = textsource.held_out_line(args.held_out, [u.text for u in plan.utterances]) if args.held_out else None
  result = synth.synthesize(plan, args.out, options=options, workers=args.workers, source=args.text or args.instructions)
  print(synth.summary(result))
  if held_out:
    print(held_out)


def data_respond(args: argparse.Namespace) -> None:
  from llasm_jax.infer.respond import respond_file

  print(respond_file(_generator(args), args.input, args.out, template=args.template, system=args.system,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch))


def _data_parser(sub) -> None:
  data = sub.add_parser("data", help="training datasets (TFDS ArrayRecord) from local audio and text")
  data_sub = data.add_subparsers(dest="data_command", required=True)
  build = data_sub.add_parser("build", help="build a dataset; bad rows are skipped and listed in build_report.json")
  kinds = build.add_subparsers(dest="kind", required=True)
  for kind, help_text in (("asr", "(audio, transcript, language) rows for stage 1"),
                          ("instructions", "conversations with spoken human turns for stage 2")):
    p = kinds.add_parser(kind, help=help_text)
    if kind == "asr":
      p.add_argument("--manifest", help='JSONL of {"audio": path, "text": ..., "language": "en"|"zh"}')
      p.add_argument("--librispeech", help="LibriSpeech folder (*/*/*.trans.txt next to .flac files)")
      p.add_argument("--aishell", help="AISHELL folder holding transcript/ and wav/")
      p.add_argument("--language", default="en", help="language of manifest rows without one (default: %(default)s)")
    else:
      p.add_argument("--json", required=True, help="LLaSM-Audio-Instructions-style JSON array or JSONL")
    p.add_argument("--audio-root", help="folder relative audio paths start from (default: the manifest's folder)")
    p.add_argument("--out", required=True, help="output folder; the dataset goes to OUT/<name>/<version>")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (default: %(default)s; 0 = in this process)")
    p.add_argument("--min-seconds", type=float, default=0.1, help="shortest audio kept (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="longest audio kept, 0 = no limit (default: %(default)s, all that llasm mode sees)")
    p.add_argument("--silence-peak", type=float, default=1e-4, help="audio whose peak is below this is silent")
    p.add_argument("--max-text-chars", type=int, default=4000 if kind == "asr" else 32000,
                   help="text budget per row in characters (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub name for --max-text-tokens")
    p.add_argument("--max-text-tokens", type=int, help="text budget per row in tokens (needs --tokenizer)")
    p.add_argument("--max-skip-share", type=float, default=0.5,
                   help="fail if more than this share of the rows is skipped (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.set_defaults(func=data_build)

  p = data_sub.add_parser("respond", help="a model's own greedy answers to text conversations or questions "
                                          "(behavior-alignment targets), batched")
  p.add_argument("--ckpt", required=True, help="model folder (a text LLM, or a LLaSM model) from `llasm-jax convert`")
  p.add_argument("--input", required=True, help="conversations (JSON array or JSONL, ShareGPT shape) or a text "
                                                "file with one question per line")
  p.add_argument("--out", required=True, help="output JSONL: the conversations with every assistant turn written")
  p.add_argument("--template", help="prompt template (default: the model folder's record, else the tokenizer's "
                                    "chat template, else llasm-cllama2 / none; see `generate --help`)")
  p.add_argument("--system", help="system prompt (default: the folder's record, else the template's own; "
                                  "'' = none)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--batch", type=int, default=16, help="conversations generated together (default: %(default)s)")
  p.add_argument("--mesh", type=_parse_mesh, help="shard on this mesh, e.g. fsdp=2,tensor=4 (DEFAULT_RULES)")
  p.add_argument("--config", help="run config whose mesh and logical_axis_rules shard the model")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's config)")
  p.set_defaults(func=data_respond)

  p = data_sub.add_parser("synth", help="speech from text with a TTS engine: audio files + the manifest / "
                                        "instructions JSONL that `data build` reads (resumable)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="sentences to speak: one per line, or JSONL of {\"text\", \"id\"?, \"language\"?}")
  source.add_argument("--instructions", help="conversations (JSON array or JSONL, LLaSM / ShareGPT shape) whose "
                                             "human turns are spoken")
  p.add_argument("--out", required=True, help="output folder: audio/, manifest.jsonl or instructions.jsonl, "
                                              "synth_report.json (a rerun keeps the audio already there)")
  p.add_argument("--engine", default="espeak", help="TTS engine: a registered name or 'package.module:factory' "
                                                    "(default: %(default)s)")
  p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                 help="synthesis processes, one engine each (default: %(default)s; 0 = in this process)")
  p.add_argument("--seed", type=int, default=0, help="voices are drawn from (seed, utterance id) (default: %(default)s)")
  p.add_argument("--reverb", metavar="DIR", help="reverberate utterances with room impulse responses: a folder of "
                                                 "wav/flac files, or 'builtin' (synthetic rooms); default: none")
  p.add_argument("--reverb-p", type=float, default=0.5, help="share of utterances reverberated (default: %(default)s)")
  p.add_argument("--snr", type=_parse_snr, metavar="LO,HI", help="add white/pink/brown noise at an SNR drawn from "
                                                                   "LO..HI dB (e.g. 5,20); default: none")
  p.add_argument("--noise-p", type=float, default=0.5, help="share of utterances given noise (default: %(default)s)")
  p.add_argument("--format", choices=("flac", "wav"), default="flac", help="16 kHz 16-bit audio files (default: %(default)s)")
  p.add_argument("--limit", type=int, help="only the first N sentences / conversations")
  p.add_argument("--language", default="auto",
                 help="language of rows without one: en, zh, ... or auto (CJK text -> zh, else en; default)")
  p.add_argument("--max-seconds", type=float, default=30.0,
                 help="longer utterances fail, 0 = no limit (default: %(default)s, what `data build` keeps)")
  p.add_argument("--held-out", help="text file, one sentence a line: print the share of its word types (and "
                                    "tokens) that the spoken text holds, and the missing words")
  p.set_defaults(func=data_synth)

  p = data_sub.add_parser("encode", help="run the frozen Whisper once over a built dataset and store its outputs "
                                         "(training then reads them: no Whisper in the step)")
  p.add_argument("--ckpt", required=True, help="LLaSM model folder whose Whisper and mode make the features")
  p.add_argument("--data", required=True, help="built dataset(s) (`data build` --out; comma-separated)")
  p.add_argument("--out", required=True, help="output folder; the dataset goes to OUT/llasm_<kind>_features/<version>")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="stored feature dtype (default: %(default)s)")
  p.add_argument("--batch", type=int, default=16, help="audio slots per Whisper call (default: %(default)s)")
  p.add_argument("--mel-frames", type=int, default=3000,
                 help="encoder mode: window in mel frames, as config.data.mel_frames (default: %(default)s = 30 s)")
  p.add_argument("--mesh", type=_parse_mesh, help="mesh over this process's devices, e.g. data=8 (default: all data)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
  p.set_defaults(func=data_encode)


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
  for field in dataclasses.fields(Options):  # one flag per option, its help and choices beside the field
    kind = str if field.default is None else _flag if isinstance(field.default, bool) else type(field.default)
    p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default,
                   choices=field.metadata.get("choices"),
                   help=field.metadata["help"] + ("" if "default" in field.metadata["help"] else " (default: %(default)s)"))
  p.set_defaults(func=demo)

  p = sub.add_parser("forward", help="random-weight forward pass on synthetic speech: shapes and timings")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="ml_collections config file (default: %(default)s)")
  p.add_argument("--seconds", type=float, default=5.0, help="audio length per sample")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--text-tokens", type=int, default=8, help="random text tokens on each side of the audio")
  p.add_argument("--repeats", type=int, default=3, help="timed forward calls after the first")
  p.add_argument("--mesh", type=_parse_mesh, default=None,
                 help="override config.mesh.shape, e.g. data=2,fsdp=2,tensor=2")
  p.set_defaults(func=forward)

  p = sub.add_parser("train", help="LLaSM stage 1 / stage 2 training (resumes from --workdir)")
  p.add_argument("--config", default="configs/tiny_stage1.py",
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
  p.add_argument("--out", required=True, help="output folder (written atomically)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored dtype")
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
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  p.set_defaults(func=convert)

  p = sub.add_parser("export", help="a llasm_jax model folder -> Hugging Face folders (llm/, whisper/, llasm/; "
                                    "a PEFT adapter in lora/ for a LoRA model)")
  p.add_argument("--ckpt", required=True, help="llasm_jax model folder (from convert or train)")
  p.add_argument("--out", required=True, help="output folder (written atomically)")
  p.add_argument("--shard-gb", type=float, default=4.0, help="safetensors shard size in GiB")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  p.add_argument("--lora", choices=("peft", "merge"), default="peft",
                 help="a LoRA model's factors: a PEFT adapter in OUT/lora/ beside the base OUT/llm/ (default), "
                      "or merged into OUT/llm/")
  p.add_argument("--merge-lora", dest="lora", action="store_const", const="merge", help="the same as --lora merge")
  p.set_defaults(func=export)

  for name, help_text in (("generate", "reply to one prompt: text, audio files, or both"),
                          ("chat", "interactive multi-turn chat; a line naming an audio file sends it")):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--ckpt", required=True, help="llasm_jax model folder (from convert or train)")
    if name == "generate":
      p.add_argument("--prompt", default="", help="the user's text (audio goes before it unless it holds <audio>)")
      p.add_argument("--audio", action="append", help="audio file (wav, flac, ogg, mp3, ...); repeat for several")
      p.add_argument("--json", action="store_true",
                     help="print one JSON object: text, token_ids, prompt_token_ids, finish_reason, timings")
    p.add_argument("--template", help="prompt template: llasm-cllama2, llasm-baichuan, chat-template (the "
                                      "tokenizer's), or none (BOS + the text). Default: the one the model folder "
                                      "records (training's), else chat-template if the tokenizer has one, else "
                                      "llasm-cllama2 for LLaSM and none for a text-only LLM")
    p.add_argument("--system", help="system prompt (default: the model folder's record, else the template's own: "
                                    "LLaSM's for llasm-*, the chat template's for chat-template; '' = none)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the released demo uses 0.2)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (not printed); repeat for several")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's config)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none", help=QUANTIZE_HELP)
    p.add_argument("--config", help="run config whose mesh and logical_axis_rules shard the model")
    p.add_argument("--mesh", type=_parse_mesh, help="shard on this mesh, e.g. fsdp=2,tensor=4 (DEFAULT_RULES)")
    p.set_defaults(func=generate if name == "generate" else chat)

  p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions with input_audio, "
                                   "/v1/audio/transcriptions, /v1/models): continuous batching over decode slots")
  p.add_argument("--ckpt", required=True, help="llasm_jax model folder (from convert or train), local or gs://")
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
  p.add_argument("--template", help="prompt template (default: the folder's, else the tokenizer's chat template, "
                                    "else llasm-cllama2 / none)")
  p.add_argument("--system", help="system prompt when a request sends none (default: the template's own)")
  p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none", help=QUANTIZE_HELP)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's config)")
  p.add_argument("--config", help="run config whose mesh and logical_axis_rules shard the model")
  p.add_argument("--mesh", type=_parse_mesh, help="shard on this mesh, e.g. data=2,tensor=4 (DEFAULT_RULES)")
  p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
  p.set_defaults(func=serve)

  p = sub.add_parser("eval", help="greedy answers over a built dataset, scored: WER / CER (asr rows), answer F1 "
                                  "(instructions); a Whisper folder transcribes (the baseline)")
  p.add_argument("--ckpt", required=True, help="llasm_jax model folder: a LLaSM, or a Whisper (asr datasets)")
  p.add_argument("--data", required=True, help="dataset folder(s) of `llasm-jax data build` or `data encode`")
  p.add_argument("--limit", type=int, help="evaluate the first N rows (default: all)")
  p.add_argument("--batch", type=int, default=8, help="rows per generate call (default: %(default)s)")
  p.add_argument("--max-new-tokens", type=int, default=128, help="per answer (default: %(default)s)")
  p.add_argument("--out", help="write the JSON report here (per-row answers and scores, totals, timings)")
  p.add_argument("--worst", type=int, default=5, help="rows of each metric to print, worst first")
  p.add_argument("--template", help="prompt template training used (default: the one the model folder records, "
                                    "else chat-template if the tokenizer has one, else llasm-cllama2)")
  p.add_argument("--system", help="system prompt training used (default: the folder's record, else the "
                                  "template's own; '' = none)")
  p.add_argument("--mel-frames", type=int, help="'encoder' mode: the audio window training used, in mel frames "
                                                "(default: 3000, or the cached dataset's)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's config)")
  p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none", help=QUANTIZE_HELP)
  p.add_argument("--config", help="run config whose mesh and logical_axis_rules shard the model")
  p.add_argument("--mesh", type=_parse_mesh, help="shard on this mesh, e.g. data=2,tensor=4 (DEFAULT_RULES)")
  p.set_defaults(func=evaluate)

  _data_parser(sub)
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


if __name__ == "__main__":
  sys.exit(main())
