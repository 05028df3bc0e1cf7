"""`llasm-jax demo` runs, measured: held-out WER beside Whisper's own, answer agreement, samples seen, wall
time per phase, with the machine; and the table of several runs.

  python bench/demo_run.py [--workdir DIR] [--out bench/results/demo_cpu2.json] [--data-from DIR]
                           [demo options as --key=value]
  python bench/demo_run.py --table OUT.md RESULTS.json ...

--data-from DIR: start from DIR's finished data phases (convert .. whisper) instead of making them
again, when every option that shapes the data is DIR's (a run that differs in its training only:
--minutes, --ctc-share, --ctc-weight, --loss, --lr, ...). Its training phases run anew.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_name  # noqa: E402  (bench/machine.py, beside this script)

DATA_PHASES = ("models", "convert", "texts", "respond", "synth", "build", "encode", "whisper")
# Options that shape the data phases: a run may reuse another's data only if these are the same.
DATA_OPTIONS = ("whisper", "llm", "sentences", "mix", "piper_share", "augment_share", "held_out", "questions",
                "held_out_questions", "mode", "adaptor", "stack_factor", "adaptor_hidden", "answer_tokens", "seed")


def portable(obj, names: dict[str, str]):
  """`obj` with the machine's own folders written as names (results are read on other machines)."""
  if isinstance(obj, dict):
    return {k: portable(v, names) for k, v in obj.items()}
  if isinstance(obj, list):
    return [portable(v, names) for v in obj]
  if isinstance(obj, str):
    for path, name in names.items():
      obj = obj.replace(path, name)
  return obj


def seed_data(workdir: str, source: str, options) -> None:
  """Copies `source`'s finished data phases into `workdir`'s phases.json (their files stay in `source`)."""
  with open(os.path.join(source, "phases.json")) as f:
    done = json.load(f)
  with open(os.path.join(source, "results.json")) as f:
    theirs = json.load(f)["options"]
  mine = dataclasses.asdict(options)
  differ = [k for k in DATA_OPTIONS if theirs.get(k) != mine.get(k)]
  if differ:
    raise SystemExit(f"--data-from {source}: its data was made with other {', '.join(differ)}; run without it")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "phases.json"), "w") as f:
    json.dump({k: v for k, v in done.items() if k in DATA_PHASES}, f, indent=1)


def run(args, rest) -> None:
  from llasm_jax.demo import Options, run_demo

  fields = {f.name: f for f in dataclasses.fields(Options)}
  overrides = {}
  for item in rest:
    key, _, value = item.lstrip("-").partition("=")
    key = key.replace("-", "_")  # the flag's name only: values such as 2e-3 keep their dashes
    if key not in fields:
      raise SystemExit(f"{item!r}: not a demo option; expected one of {', '.join(fields)}")
    default = fields[key].default
    if isinstance(default, bool):
      overrides[key] = value.lower() in ("true", "1", "yes")
    else:
      overrides[key] = value if default is None else type(default)(value)
  options = Options(workdir=args.workdir, **overrides)
  if args.data_from:
    seed_data(os.path.abspath(args.workdir), os.path.abspath(args.data_from), options)
  load_before = os.getloadavg()[0]
  results = run_demo(options)
  import jax

  results["machine"] = {"device": f"{jax.devices()[0].platform} x{jax.device_count()}", "cpu": cpu_name(),
                        "cores": os.cpu_count(), "jax": jax.__version__,
                        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
  results["data_from"] = args.data_from
  names = {os.path.abspath(args.workdir): "WORKDIR", sys.prefix: "VENV"}
  if args.data_from:
    names[os.path.abspath(args.data_from)] = "DATA_WORKDIR"
  results = portable(results, names)
  print(json.dumps({k: results[k] for k in ("whisper", "after", "phases_s", "samples_seen")}, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


def table(out: str, files: list[str]) -> None:
  """One markdown row per results file: held-out WER (Whisper alone -> the model), agreement, samples."""
  rows = [json.load(open(f)) for f in files]
  sets = [s for s in rows[0]["after"] if not s.startswith("questions")]
  questions = [s for s in rows[0]["after"] if s.startswith("questions")]
  head = ["run", "minutes", *[f"{s} WER" for s in sets], *[f"{s} F1" for s in questions], "samples seen",
          "total min"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
           "| Whisper tiny.en alone | | " + " | ".join(f"{100 * rows[0]['whisper'][s]['wer']:.1f}%" for s in sets)
           + " |" * (len(questions) + 3)]
  for f, r in zip(files, rows):
    cells = [os.path.splitext(os.path.basename(f))[0], f"{r['options']['minutes']:g}",
             *[f"{100 * r['after'][s]['wer']:.1f}%" for s in sets],
             *[f"{r['after'][s]['f1']:.3f}" for s in questions], str(r["samples_seen"]),
             f"{sum(r['phases_s'].values()) / 60:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  machine = rows[0]["machine"]
  lines += ["", f"Machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}."]
  with open(out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.join("workdir", "demo_bench"))
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--data-from", help="reuse this workdir's data phases (see the module docstring)")
  parser.add_argument("--table", help="write a markdown table of the results files given after it")
  args, rest = parser.parse_known_args()
  if args.table:
    table(args.table, rest)
  else:
    run(args, rest)


if __name__ == "__main__":
  main()
