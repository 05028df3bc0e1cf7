"""Feature extraction + tokenization throughput (samples/s per CPU core) against WhisperFeatureExtractor.

  python bench/data_speed.py [--tokenizer DIR] [--repeats 5] [--pipeline-workers 2] [--json out.json]

Per sample, one core (BLAS/torch/tokenizer threads pinned to 1): the Whisper log-mel of one
clip, then the stage-1 conversation ("transcribe" instruction + audio markers + transcript)
through the llasm-cllama2 template. "ours" is llasm_jax.data.features.log_mel; "hf" is
transformers.WhisperFeatureExtractor on the same audio (its torch STFT, as installed), followed
by the same tokenization. Clips: the shared assets (2.8-4.5 s speech) and synthetic speech of
5, 15 and 30 s. Then the whole grain pipeline (featurize + tokenize + batch) with worker
processes. Without --tokenizer a small LLaMA-style sentencepiece tokenizer is trained on the fly.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llasm_jax.data import features, pipeline, templates  # noqa: E402
from llasm_jax.data.audio import load_audio  # noqa: E402

# The shared assets sit beside the checkout: <checkout>/../shared/assets.
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "assets")


def make_tokenizer(folder: str) -> str:
  """A LLaMA-style sentencepiece BPE (byte fallback) with the audio tokens; returns its folder."""
  import random

  import sentencepiece as spm
  from transformers import LlamaTokenizer

  rng = random.Random(0)
  words = ("the speech audio model hello world weather paris what is this one two three four five assistant "
           "language helpful you are able to understand content provides tasks natural please transcribe").split()
  lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(500)]
  lines += ["请介绍一下勾股定理哪个国家人口最多北京天气", templates.LLASM_SYSTEM, "[INST] <<SYS>> <</SYS>> [/INST]"] * 5
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=os.path.join(folder, "tokenizer"), vocab_size=600,
      model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
  tok = LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
  tok.add_tokens(list(templates.MARKERS), special_tokens=True)
  out = os.path.join(folder, "hf")
  tok.save_pretrained(out)
  return out


def clips() -> dict[str, list[np.ndarray]]:
  src = pipeline.SyntheticSource("asr", 1, seed=0)
  rng = np.random.default_rng(0)
  out = {"assets (2.8-4.5 s)": [load_audio(p) for p in sorted(glob.glob(os.path.join(ASSETS, "speech_*", "*")))]}
  for seconds in (5, 15, 30):
    src.seconds = (seconds, seconds)
    out[f"synthetic {seconds} s"] = [src._clip(rng).astype(np.float32) / 32768 for _ in range(4)]
  return out


def per_sample_seconds(fn, audios, repeats: int) -> float:
  fn(audios[0])  # warm caches (filters, imports)
  best = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for a in audios:
      fn(a)
    best.append((time.perf_counter() - t0) / len(audios))
  return min(best)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokenizer", help="tokenizer folder with the audio tokens (default: a tiny one trained here)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pipeline-workers", type=int, default=2)
  parser.add_argument("--pipeline-batches", type=int, default=12)
  parser.add_argument("--json", help="also write the numbers here")
  args = parser.parse_args()

  import threadpoolctl
  import torch
  from transformers import AutoTokenizer, WhisperFeatureExtractor

  torch.set_num_threads(1)
  threadpoolctl.threadpool_limits(1)
  tmp = tempfile.mkdtemp(prefix="llasm_data_bench_")
  tok_dir = args.tokenizer or make_tokenizer(tmp)
  tok = AutoTokenizer.from_pretrained(tok_dir)
  template = templates.get_template("llasm-cllama2", tok)
  rng = np.random.default_rng(0)

  def tokenize(mode, frames):
    msgs = templates.asr_messages("what will the weather be like in paris this weekend", "en", rng)
    p = 64 if mode == "llasm" else -(-((frames - 1) // 2 + 1) // 8)
    return template.encode(msgs, [p])

  results = []
  print(f"{'clips':22s} {'mels':>4s} {'mode':>7s} {'ours/s':>8s} {'hf/s':>8s} {'speedup':>7s} {'tok ms':>7s}")
  for name, audios in clips().items():
    for mels in (80, 128):
      fe = WhisperFeatureExtractor(feature_size=mels)
      for mode in ("llasm", "encoder"):
        padding = "max_length" if mode == "llasm" else "longest"

        def ours(a):
          mel = features.log_mel(a, mels, mode)
          return tokenize(mode, mel.shape[1])

        def hf(a):
          mel = fe(a, sampling_rate=16000, padding=padding, return_tensors="np").input_features[0]
          return tokenize(mode, mel.shape[1])

        tok_s = per_sample_seconds(lambda a: tokenize(mode, len(a) // 160), audios, args.repeats)
        t_ours = per_sample_seconds(ours, audios, args.repeats)
        t_hf = per_sample_seconds(hf, audios, args.repeats)
        results.append({"clips": name, "mel_bins": mels, "mode": mode, "ours_samples_per_s": 1 / t_ours,
                        "hf_samples_per_s": 1 / t_hf, "speedup": t_hf / t_ours, "tokenize_ms": tok_s * 1e3})
        print(f"{name:22s} {mels:4d} {mode:>7s} {1 / t_ours:8.0f} {1 / t_hf:8.0f} {t_hf / t_ours:6.1f}x "
              f"{tok_s * 1e3:7.2f}")

  # The whole pipeline: featurize + tokenize + collate into host batches, in worker processes.
  from llasm_jax.models.llasm import LLASM_PRESETS

  base = LLASM_PRESETS["tiny"]
  n_tok = len(tok)
  model = base.replace(llm=base.llm.replace(vocab_size=n_tok), audio_patch_id=tok.convert_tokens_to_ids("<au_patch>"),
                       audio_start_id=tok.convert_tokens_to_ids("<au_start>"),
                       audio_end_id=tok.convert_tokens_to_ids("<au_end>"), audio_token_len=64)
  cfg = pipeline.PipelineConfig.from_model(model, seq_len=512)
  # A built dataset (ArrayRecord reads + deserialization included), of 2-15 s synthetic speech.
  import soundfile as sf

  from llasm_jax.data import builders

  src = pipeline.SyntheticSource("asr", 128, seed=0, seconds=(2.0, 15.0))
  lines = []
  for i in range(len(src)):
    r = src[i]
    path = os.path.join(tmp, f"clip{i}.wav")
    sf.write(path, r["audio"], 16000)
    lines.append(json.dumps({"audio": path, "text": r["text"].decode(), "language": "en"}))
  with open(os.path.join(tmp, "manifest.jsonl"), "w") as f:
    f.write("\n".join(lines))
  built = builders.build("asr", builders.manifest_rows(os.path.join(tmp, "manifest.jsonl")),
                         os.path.join(tmp, "ds"), quiet=True).path
  batch = 16
  pipe = {}
  for workers in sorted({0, args.pipeline_workers}):
    with pipeline.make_iterator(built, cfg, tok_dir, batch_size=batch, shard_index=0, shard_count=1,
                                workers=workers, threads=1) as it:
      next(it)  # start-up (worker spawn, imports) is not throughput
      t0 = time.perf_counter()
      for _ in range(args.pipeline_batches):
        next(it)
      rate = args.pipeline_batches * batch / (time.perf_counter() - t0)
    pipe[workers] = rate
    print(f"pipeline from a built dataset, llasm mode, 80 mels, 2-15 s clips, batch {batch}, {workers} worker "
          f"processes: {rate:.0f} samples/s" + (f" ({rate / workers:.0f} per worker)" if workers else
                                                " (in the main process)"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"per_core": results, "pipeline_samples_per_s": pipe, "cpus": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
  main()
