"""Spoken-data synthesis speed: seconds of audio made per second of wall time, English and Mandarin.

  python bench/synth_speed.py [--utterances 300] [--workers 0,1,2] [--out bench/results/synth_speed_cpu2]

Runs `llasm_jax.data.synth` end to end as `llasm-jax data synth --text` does (plan, espeak in
worker processes, 16 kHz FLAC written atomically, manifest and report), on `--utterances`
sentences per language into a fresh folder each time: English from `textsource` (the package's
sentence grammar), Mandarin from a small phrase grammar here. workers=0 renders in this process
(no process start); 1 and 2 include spawning the workers (a second or so). Other processes on
the machine slow every row; the load average is recorded with the numbers. Writes OUT.json and
OUT.md when --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_name  # noqa: E402  (bench/machine.py, beside this script)

from llasm_jax.data import synth, textsource  # noqa: E402

ZH_SUBJECTS = ("我", "你", "我们", "老师", "我的朋友", "这个孩子", "他们", "妈妈", "医生", "司机")
ZH_TIMES = ("今天", "明天", "昨天晚上", "周末", "早上", "下午", "每天")
ZH_VERBS = ("去了", "想去", "喜欢", "看见了", "买了", "需要", "打算去")
ZH_OBJECTS = ("北京", "图书馆", "一本新书", "公园", "一杯咖啡", "火车站", "新的手机", "博物馆", "超市", "一些水果")
ZH_QUESTIONS = ("请介绍一下{o}", "{s}{t}为什么{v}{o}？", "你知道{o}在哪里吗？", "{o}怎么样？")


def mandarin(n: int, seed: int = 0) -> list[str]:
  """`n` distinct Mandarin sentences and questions of 5-20 characters."""
  import numpy as np

  rng = np.random.default_rng(seed)
  pick = lambda pool: pool[int(rng.integers(len(pool)))]
  out: dict[str, None] = {}
  while len(out) < n:
    if rng.random() < 0.6:
      text = f"{pick(ZH_SUBJECTS)}{pick(ZH_TIMES)}{pick(ZH_VERBS)}{pick(ZH_OBJECTS)}。"
    else:
      text = pick(ZH_QUESTIONS).format(s=pick(ZH_SUBJECTS), t=pick(ZH_TIMES), v=pick(ZH_VERBS), o=pick(ZH_OBJECTS))
    out[text] = None
  return list(out)


def machine() -> dict:
  cpu = cpu_name()
  from llasm_jax.data.tts_espeak import EspeakEngine

  return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
          "espeak_ng": EspeakEngine().version}


def run(texts: list[str], language: str, workers: int) -> dict:
  with tempfile.TemporaryDirectory() as work:
    src = os.path.join(work, "sentences.txt")
    with open(src, "w", encoding="utf-8") as f:
      f.write("\n".join(texts) + "\n")
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    result = synth.synthesize(synth.plan_text(src, language=language), os.path.join(work, "out"), workers=workers,
                              quiet=True)
    wall = time.perf_counter() - t0
  r = result.report
  assert r["failed"] == 0, r["failures"][:3]
  audio_s = r["made_hours"] * 3600
  return {"language": language, "workers": workers, "utterances": r["made"], "audio_s": round(audio_s, 1),
          "mean_utterance_s": round(audio_s / r["made"], 2), "wall_s": round(wall, 2),
          "audio_s_per_s": round(audio_s / wall, 1), "ms_per_utterance": round(1000 * wall / r["made"], 2),
          "load_avg_1m": load}


def markdown(results: dict) -> str:
  m = results["machine"]
  lines = [f"# data synth speed (espeak-ng {m['espeak_ng']}, {m['cpu']}, {m['cores']} CPU cores)", "",
           f"{results['utterances']} sentences per language, 16 kHz FLAC, end to end (`synth.synthesize`); "
           "workers 0 = in this process, 1 and 2 include starting the worker processes.", "",
           "| language | workers | audio (s) | wall (s) | s of audio per s | ms per utterance | load avg |",
           "|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    lines.append(f"| {r['language']} | {r['workers']} | {r['audio_s']} | {r['wall_s']} | {r['audio_s_per_s']} | "
                 f"{r['ms_per_utterance']} | {r['load_avg_1m']} |")
  busiest = max(r["load_avg_1m"] for r in results["rows"])
  if busiest > m["cores"]:
    lines += ["", f"The machine was shared while this ran (load average up to {busiest} on {m['cores']} cores): "
              "the rows are lower bounds, and more workers cannot show their scaling when no core is free."]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--utterances", type=int, default=300, help="sentences per language")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--out", help="write OUT.json and OUT.md (e.g. bench/results/synth_speed_cpu2)")
  parser.add_argument("--from-json", help="only rewrite the markdown of an earlier OUT.json")
  args = parser.parse_args()
  if args.from_json:
    with open(args.from_json) as f:
      results = json.load(f)
    with open(os.path.splitext(args.from_json)[0] + ".md", "w") as f:
      f.write(markdown(results))
    return
  texts = {"en": textsource.sentences(args.utterances, seed=0), "zh": mandarin(args.utterances, seed=0)}
  rows = []
  for language in ("en", "zh"):
    for workers in (int(w) for w in args.workers.split(",")):
      rows.append(run(texts[language], language, workers))
      print(json.dumps(rows[-1]), flush=True)
  results = {"machine": machine(), "utterances": args.utterances, "rows": rows}
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(markdown(results))
  print(markdown(results))


if __name__ == "__main__":
  main()
