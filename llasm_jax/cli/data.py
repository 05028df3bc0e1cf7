"""`llasm-jax data build | respond | synth | encode`: the flags of each, and what it runs."""

from __future__ import annotations

import argparse

import jax

from llasm_jax.cli.commands import load_generator
from llasm_jax.cli.flags import add_flags, parse_snr


def data_build(args: argparse.Namespace) -> None:
  from llasm_jax.data import builders

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

  print(respond_file(load_generator(args), args.input, args.out, template=args.template, system=args.system,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch))


def add_parser(sub) -> None:
  """The `data` command and its subcommands, on the subparsers `sub` of the top-level parser."""
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
    add_flags(p, "out", "workers", out="output folder; the dataset goes to OUT/<name>/<version>",
           workers="decoding processes (default: %(default)s; 0 = in this process)")
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
    add_flags(p, "overwrite", overwrite="replace an existing dataset in --out")
    p.set_defaults(func=data_build)

  p = data_sub.add_parser("respond", help="a model's own greedy answers to text conversations or questions "
                                          "(behavior-alignment targets), batched")
  add_flags(p, "ckpt", ckpt="model folder (a text LLM, or a LLaSM model) from `llasm-jax convert`")
  p.add_argument("--input", required=True, help="conversations (JSON array or JSONL, ShareGPT shape) or a text "
                                                "file with one question per line")
  add_flags(p, "out", "template", "system",
         out="output JSONL: the conversations with every assistant turn written",
         template="prompt template (default: the model folder's record, else the tokenizer's chat template, else "
                  "llasm-cllama2 / none; see `generate --help`)",
         system="system prompt (default: the folder's record, else the template's own; '' = none)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--batch", type=int, default=16, help="conversations generated together (default: %(default)s)")
  add_flags(p, "mesh", "config", "dtype")
  p.set_defaults(func=data_respond)

  p = data_sub.add_parser("synth", help="speech from text with a TTS engine: audio files + the manifest / "
                                        "instructions JSONL that `data build` reads (resumable)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="sentences to speak: one per line, or JSONL of {\"text\", \"id\"?, \"language\"?}")
  source.add_argument("--instructions", help="conversations (JSON array or JSONL, LLaSM / ShareGPT shape) whose "
                                             "human turns are spoken")
  add_flags(p, "out", out="output folder: audio/, manifest.jsonl or instructions.jsonl, synth_report.json (a rerun "
                       "keeps the audio already there)")
  p.add_argument("--engine", default="espeak", help="TTS engine: a registered name or 'package.module:factory' "
                                                    "(default: %(default)s)")
  add_flags(p, "workers", workers="synthesis processes, one engine each (default: %(default)s; 0 = in this process)")
  p.add_argument("--seed", type=int, default=0, help="voices are drawn from (seed, utterance id) (default: %(default)s)")
  p.add_argument("--reverb", metavar="DIR", help="reverberate utterances with room impulse responses: a folder of "
                                                 "wav/flac files, or 'builtin' (synthetic rooms); default: none")
  p.add_argument("--reverb-p", type=float, default=0.5, help="share of utterances reverberated (default: %(default)s)")
  p.add_argument("--snr", type=parse_snr, metavar="LO,HI", help="add white/pink/brown noise at an SNR drawn from "
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
  add_flags(p, "ckpt", ckpt="LLaSM model folder whose Whisper and mode make the features")
  p.add_argument("--data", required=True, help="built dataset(s) (`data build` --out; comma-separated)")
  add_flags(p, "out", out="output folder; the dataset goes to OUT/llasm_<kind>_features/<version>")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="stored feature dtype (default: %(default)s)")
  p.add_argument("--batch", type=int, default=16, help="audio slots per Whisper call (default: %(default)s)")
  p.add_argument("--mel-frames", type=int, default=3000,
                 help="encoder mode: window in mel frames, as config.data.mel_frames (default: %(default)s = 30 s)")
  add_flags(p, "mesh", "overwrite", mesh="mesh over this process's devices, e.g. data=8 (default: all data)",
         overwrite="replace an existing dataset in --out")
  p.set_defaults(func=data_encode)
