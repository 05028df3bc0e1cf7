"""What each `llasm-jax` command runs, given its parsed flags: load, call the package, print."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time as time_module

import jax

from llasm_jax import sharding
from llasm_jax.config import config_name, load_config_file
from llasm_jax.errors import UserError

DEFAULT_CONFIG = "configs/tiny.py"


def _find_config(path: str) -> pathlib.Path:
  """`path` as given, else relative to the repository checkout (so `llasm-jax forward` works anywhere)."""
  p = pathlib.Path(path)
  if p.is_file() or p.is_absolute():
    return p
  repo = pathlib.Path(__file__).resolve().parents[2]
  return repo / p if (repo / p).is_file() else p


def forward(args: argparse.Namespace) -> None:
  from llasm_jax.infer.forward import run_forward

  run_forward(load_config_file(_find_config(args.config)), config_name=args.config, batch=args.batch,
              seconds=args.seconds, text_tokens=args.text_tokens, repeats=args.repeats, mesh_shape=args.mesh)


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
  trainer.train(config, args.workdir or os.path.join("workdir", config_name(args.config)))


def convert(args: argparse.Namespace) -> None:
  from llasm_jax.convert.convert import convert as run

  print(run(args.llm, args.whisper, out=args.out, dtype=args.dtype, mode=args.mode, adaptor=args.adaptor,
            stack_factor=args.stack_factor, adaptor_hidden=args.adaptor_hidden, audio_tokens=args.audio_tokens,
            overwrite=args.overwrite))


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


def load_generator(args: argparse.Namespace):
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
  gen = load_generator(args)
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

  session = Chat(load_generator(args), template=args.template)
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

  generator = load_generator(args)
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
