"""int8 weights (`llasm_jax.quantize`, through qwix) vs float: weight memory, greedy agreement, decode speed.

  python bench/quantize_speed.py [--models 100m,smollm2] [--batches 1,8] [--prompt-len 64] [--new-tokens 64]
                                 [--repeats 5] [--out bench/results/quantize_cpu2]

Models: the `llama_100m` preset (random float32 weights, untied LM head) and SmolLM2-135M-Instruct
(the registry's GGUF Q4_1, dequantized to float32 by `convert`; tied head). Variants:
  float32   as stored
  bfloat16  compute and weights in bfloat16 (run options dtype and param_dtype)
  int8      weight-only: int8 kernels + float32 scales, float32 activations (qwix dequantizes)
  w8a8      int8 kernels and per-token int8 activations (qwix's int8 x int8 dot)
Measured: parameter bytes by dtype; greedy agreement with float32 (SmolLM2: 16 short questions
through its chat template; llama_100m: random token prompts), as tokens equal up to the first
difference and whole answers equal; decode tokens/s over all rows (Engine timings: the steps after
the first token, a fixed number of them, no EOS) at each batch, best of --repeats runs taken round
robin over the variants so that a busy spell of a shared CPU hits them alike; and one projection's
matmul in each form, to show where the time goes.

Writes OUT.json (every number, the machine and its load average) and OUT.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import cpu_name  # noqa: E402  (bench/machine.py, beside this script)

VARIANTS = ("float32", "bfloat16", "int8", "w8a8")
QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?", "What is 12 times 7?",
    "Name three primary colors.", "Why is the sky blue?", "What does a bee make?",
    "Give me a synonym for happy.", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What is the largest planet in our solar system?",
    "Translate 'thank you' into Spanish.", "What is photosynthesis?", "How many days are in a leap year?",
    "What gas do humans breathe out?", "Write a haiku about the sea.", "What is the opposite of cold?",
]


def machine() -> dict:
  import jax

  return {"device": f"{jax.devices()[0].platform} x{jax.device_count()}", "cpu": cpu_name(), "cores": os.cpu_count(),
          "jax": jax.__version__, "shared": "other people's jobs ran on the same 2 cores; see load_avg per row"}


def load_avg() -> float:
  return round(os.getloadavg()[0], 2)


def run_options(variant: str) -> dict:
  return {"dtype": "bfloat16", "param_dtype": "bfloat16"} if variant == "bfloat16" else {}


def quantize_mode(variant: str) -> str:
  return variant if variant in ("int8", "w8a8") else "none"


# ---- models --------------------------------------------------------------------------------

def random_100m():
  """{variant: model} of one random float32 llama_100m (bfloat16: the same weights cast)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from llasm_jax.models.llama import LLAMA_PRESETS, LlamaForCausalLM
  from llasm_jax.quantize import quantize

  cfg = LLAMA_PRESETS["llama_100m"]
  base = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  half = nnx.eval_shape(lambda: LlamaForCausalLM(cfg.replace(**run_options("bfloat16")), rngs=nnx.Rngs(0)))
  nnx.update(half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(base)))
  return {"float32": base, "bfloat16": half, "int8": quantize(base, "int8"), "w8a8": quantize(base, "w8a8")}


def smollm2_folder(work: str) -> str:
  from llasm_jax.convert.convert import convert
  from llasm_jax.convert.registry import INSTALL_HINT, smollm2_gguf

  gguf = smollm2_gguf()
  if gguf is None:
    raise SystemExit(f"SmolLM2 weights not installed: {INSTALL_HINT}")
  out = os.path.join(work, "smollm2")
  if not os.path.isdir(out):
    convert(gguf, out=out, progress=False)
  return out


def smollm2(folder: str, variant: str):
  from llasm_jax.infer.generator import Generator

  return Generator.load(folder, template="chat-template", quantize=quantize_mode(variant),
                        **run_options(variant))


# ---- measurements --------------------------------------------------------------------------

def agreement(ref: list[list[int]], out: list[list[int]]) -> dict:
  """Tokens equal up to the first difference (summed over answers, and as a share of the float
  answers' tokens) and answers equal as a whole."""
  same = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o))) for r, o in zip(ref, out)]
  return {"prefix_tokens": int(sum(same)), "ref_tokens": int(sum(map(len, ref))),
          "prefix_share": round(sum(same) / max(1, sum(map(len, ref))), 4),
          "answers_equal": int(sum(r == o for r, o in zip(ref, out))), "answers": len(ref),
          "per_answer_prefix": same}


def teacher_forced(models: dict, sequences: list[list[int]], starts: list[int]) -> dict:
  """Each variant's next-token logits along the float32 model's own greedy sequences (prompt +
  answer; row i's answer starts at starts[i]), against float32's: relative error of the logits
  over the answer positions, and how often their argmax (float32's greedy token) is the same."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  t = max(map(len, sequences))
  ids = np.zeros((len(sequences), t), np.int32)
  mask = np.zeros(ids.shape, bool)
  for i, seq in enumerate(sequences):
    ids[i, :len(seq)], mask[i, :len(seq)] = seq, True
  at = np.zeros(ids.shape, bool)  # the positions that predict answer tokens
  for i, (seq, start) in enumerate(zip(sequences, starts)):
    at[i, start - 1:len(seq) - 1] = True
  logits = {}
  for v, model in models.items():
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask)[0])
    logits[v] = np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask)), np.float32)[at][:, :models[v].cfg.vocab_size]
  ref = logits["float32"]
  return {v: {"logits_rel_error": round(float(np.linalg.norm(x - ref) / np.linalg.norm(ref)), 5),
              "argmax_agreement": round(float(np.mean(x.argmax(-1) == ref.argmax(-1))), 4),
              "positions": int(at.sum())} for v, x in logits.items() if v != "float32"}


def decode_temp_mib(engine) -> float | None:
  """MiB of temporaries of the engine's compiled decode loop (XLA's memory analysis), or None."""
  try:
    import jax
    import jax.numpy as jnp

    fn = next(f for k, f in engine.fns._jitted.items() if k[0] == "decode")
    ds = next(f for k, f in engine.fns._jitted.items() if k[0] == "prefill")
    ids, mask, active = engine._pad_prompts([[5] * 8])
    from llasm_jax.infer.sampling import SamplingParams

    params = SamplingParams().arrays()
    state = ds(engine.llm_state, ids, mask, active, None, jax.random.key(0), *params)
    compiled = fn.lower(engine.llm_state, state, jnp.int32(2), jnp.zeros(ids.shape[0], bool), *params).compile()
    return round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
  except Exception as e:  # the engine's internals change; the rest of the run does not depend on this
    print(f"  (decode temp memory not measured: {e})", flush=True)
    return None


def decode_speed(engines: dict, vocab: int, batches, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  """{batch: {variant: best decode tokens/s}}, the variants timed in turn within each repeat."""
  out = {}
  for batch in batches:
    prompts = np.random.default_rng(batch).integers(3, vocab, (batch, prompt_len)).tolist()
    for e in engines.values():
      e.generate(prompts, max_new_tokens=new_tokens)  # compiles this bucket
    rates = {v: [] for v in engines}
    load = [load_avg()]
    for _ in range(repeats):
      for v, e in engines.items():
        _, t = e.generate(prompts, max_new_tokens=new_tokens)
        assert t.decode_steps == new_tokens - 1
        rates[v].append(t.decode_tokens_per_s)
    load.append(load_avg())
    out[batch] = {v: {"tokens_per_s": round(max(r), 1), "runs": [round(x, 1) for x in r]} for v, r in rates.items()}
    out[batch]["load_avg"] = load
    print(f"  batch {batch}: " + ", ".join(f"{v} {out[batch][v]['tokens_per_s']}" for v in engines)
          + f" tok/s (load {load})", flush=True)
    if batch == batches[0]:
      out["decode_temp_mib"] = {v: decode_temp_mib(e) for v, e in engines.items()}
  return out


def matmul_forms(d: int, f: int, repeats: int = 20) -> dict:
  """Milliseconds of one [M, d] x [d, f] projection (best of `repeats`) in each form, M = 1 and 8,
  and whether the weight-only form writes the dequantized float kernel out before the dot."""
  import jax
  import jax.numpy as jnp
  import qwix

  w = jax.random.normal(jax.random.key(0), (d, f), jnp.float32) * 0.02
  qw = qwix.quantize(w, jnp.int8, channelwise_axes=(1,))
  dims = (((1,), (0,)), ((), ()))
  forms = {
      "float32": (jax.jit(lambda x, w: x @ w), lambda x: (x, w)),
      "bfloat16": (jax.jit(lambda x, w: x.astype(jnp.bfloat16) @ w), lambda x: (x, w.astype(jnp.bfloat16))),
      # qwix.dot_general of a float lhs and a QArray: dequantize, then a float matmul.
      "int8 weight-only": (jax.jit(lambda x, q: qwix.dot_general(x, q, dims)), lambda x: (x, qw)),
      # Both int8 (dynamic per-row activation scales): int8 x int8 -> int32, rescaled.
      "w8a8": (jax.jit(lambda x, q: qwix.dot_general(qwix.quantize(x, jnp.int8, channelwise_axes=(0,)), q, dims)),
               lambda x: (x, qw)),
  }
  out = {}
  for m in (1, 2, 8):
    x = jax.random.normal(jax.random.key(1), (m, d), jnp.float32)
    row = {}
    for name, (fn, args) in forms.items():
      a = args(x)
      fn(*a).block_until_ready()
      ts = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*a).block_until_ready()
        ts.append(time.perf_counter() - t0)
      row[name] = round(min(ts) * 1e3, 3)
    out[f"M={m}"] = row
  hlo = forms["int8 weight-only"][0].lower(*forms["int8 weight-only"][1](jnp.ones((1, d)))).compile().as_text()
  out["weight_only_writes_float_kernel"] = any(f"f32[{d},{f}]" in line and "fusion(" in line
                                               for line in hlo.splitlines())
  out["kernel_bytes"] = {"float32": d * f * 4, "int8": d * f + f * 4}
  return out


def param_count(model) -> int:
  import jax
  from flax import nnx

  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ---- the two models ------------------------------------------------------------------------

def bench_100m(args) -> dict:
  from llasm_jax.infer import Engine
  from llasm_jax.quantize import weight_bytes

  print("llama_100m (random weights)", flush=True)
  models = random_100m()
  vocab = models["float32"].cfg.vocab_size
  prompts = np.random.default_rng(0).integers(3, vocab, (16, 24)).tolist()
  greedy = {v: [o.token_ids for o in Engine(m, eos_ids=[]).generate(prompts, max_new_tokens=32)[0]]
            for v, m in models.items()}
  engines = {v: Engine(m, eos_ids=[]) for v, m in models.items()}
  return {
      "params": param_count(models["float32"]),
      "weight_bytes": {v: weight_bytes(m) for v, m in models.items()},
      "agreement_vs_float32": {v: agreement(greedy["float32"], greedy[v]) for v in VARIANTS[1:]},
      "agreement_prompts": "16 random-token prompts of 24 tokens, 32 greedy tokens each",
      "teacher_forced_vs_float32": teacher_forced(models, [p + g for p, g in zip(prompts, greedy["float32"])],
                                                  [len(p) for p in prompts]),
      "decode": decode_speed(engines, vocab, args.batches, args.prompt_len, args.new_tokens, args.repeats),
      "matmul_ms": {"gate_proj 768x2048": matmul_forms(768, 2048), "lm_head 768x32000": matmul_forms(768, 32000)},
  }


def bench_smollm2(args, work: str) -> dict:
  from llasm_jax.infer import Engine
  from llasm_jax.quantize import weight_bytes

  print("SmolLM2-135M-Instruct", flush=True)
  folder = smollm2_folder(work)
  gens = {v: smollm2(folder, v) for v in VARIANTS}
  answers = {}
  for v, g in gens.items():
    t0 = time.perf_counter()
    res = g.generate(QUESTIONS, max_new_tokens=args.answer_tokens)
    answers[v] = {"token_ids": [r.token_ids for r in res], "prompt_token_ids": [r.prompt_token_ids for r in res],
                  "text": [r.text for r in res], "s": round(time.perf_counter() - t0, 1)}
    print(f"  {v}: {answers[v]['text'][0]!r}", flush=True)
  ref = answers["float32"]
  model = gens["float32"].engine.model
  engines = {v: Engine(g.engine.model, eos_ids=[]) for v, g in gens.items()}
  return {
      "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to float32 (its values are already 4-bit blockwise)",
      "params": param_count(model),
      "tie_word_embeddings": model.cfg.tie_word_embeddings,
      "weight_bytes": {v: weight_bytes(g.engine.model) for v, g in gens.items()},
      "agreement_vs_float32": {v: agreement(ref["token_ids"], answers[v]["token_ids"]) for v in VARIANTS[1:]},
      "agreement_prompts": f"{len(QUESTIONS)} questions, chat template, greedy, up to {args.answer_tokens} tokens",
      "teacher_forced_vs_float32": teacher_forced(
          {v: g.engine.model for v, g in gens.items()},
          [p + a for p, a in zip(ref["prompt_token_ids"], ref["token_ids"])], list(map(len, ref["prompt_token_ids"]))),
      "answers": {v: dict(zip(QUESTIONS, a["text"])) for v, a in answers.items()},
      "decode": decode_speed(engines, model.cfg.vocab_size, args.batches, args.prompt_len, args.new_tokens,
                             args.repeats),
  }


# ---- report --------------------------------------------------------------------------------

def mib(n: int) -> str:
  return f"{n / 2**20:.1f}"


def markdown(results: dict) -> str:
  m = results["machine"]
  lines = [f"# int8 weights (qwix) vs float: {m['cpu']}, {m['cores']} CPU cores, jax {m['jax']}", "",
           f"The machine was shared with other jobs while this ran (load average per row below, on {m['cores']} "
           "cores): the rates are lower bounds and their ratios carry that noise. Decode: prompt "
           f"{results['prompt_len']} tokens, {results['new_tokens']} new tokens, greedy, best of "
           f"{results['repeats']} runs taken round robin.", "",
           "Columns: weights = parameter bytes (int8 kernels + every float array: embedding, norms, scales, a "
           "float head); decode temp = XLA's temporaries of the compiled decode loop (a dequantized or "
           "converted weight lives there); greedy = free-running answers against float32's, tokens equal up to "
           "the first difference; teacher-forced = the next-token logits along float32's own answers.", ""]
  for name, r in results["models"].items():
    lines += [f"## {name}", ""]
    if "gguf" in r:
      lines += [f"Weights: {r['gguf']}; tied LM head (int8 with the embedding: each step multiplies by the "
                "dequantized table, which XLA:CPU writes out first).", ""]
    batches = [b for b in r["decode"] if str(b).isdigit()]  # ints here, strings when read back from OUT.json
    lines += ["| variant | weights MiB (int8 + float) | decode temp MiB | greedy tokens = float32 (to 1st diff) | "
              "answers = float32 | logits rel. error (teacher-forced) | argmax = float32 (teacher-forced) | "
              + " | ".join(f"decode tok/s b{b}" for b in batches) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(batches)]
    for v in VARIANTS:
      wb = r["weight_bytes"][v]
      floats = sum(n for k, n in wb.items() if k not in ("int8", "total"))
      ag, tf = r["agreement_vs_float32"].get(v), r["teacher_forced_vs_float32"].get(v)
      agree = "-" if ag is None else f"{ag['prefix_tokens']}/{ag['ref_tokens']} ({100 * ag['prefix_share']:.0f}%)"
      equal = "-" if ag is None else f"{ag['answers_equal']}/{ag['answers']}"
      err = "-" if tf is None else f"{100 * tf['logits_rel_error']:.2f}%"
      top1 = "-" if tf is None else f"{100 * tf['argmax_agreement']:.1f}% of {tf['positions']}"
      rates = " | ".join(str(r["decode"][b][v]["tokens_per_s"]) for b in batches)
      temp = r["decode"].get("decode_temp_mib", {}).get(v)
      lines.append(f"| {v} | {mib(wb['total'])} ({mib(wb.get('int8', 0))} + {mib(floats)}) | {temp} | {agree} | "
                   f"{equal} | {err} | {top1} | {rates} |")
    loads = ", ".join(f"b{b}: {r['decode'][b]['load_avg']}" for b in batches)
    lines += ["", f"Load average during the decode runs (start, end): {loads}.", ""]
    for shape, mm in r.get("matmul_ms", {}).items():
      lines += [f"One projection, {shape} (ms, best of 20; weight-only writes the dequantized float32 kernel "
                f"out before the dot: {mm['weight_only_writes_float_kernel']}):", "",
                "| M | " + " | ".join(mm["M=1"]) + " |", "|---|" + "---|" * len(mm["M=1"])]
      for key in ("M=1", "M=2", "M=8"):
        lines.append(f"| {key[2:]} | " + " | ".join(str(x) for x in mm[key].values()) + " |")
      lines.append("")
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="100m,smollm2")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--answer-tokens", type=int, default=48, help="SmolLM2 answers: greedy tokens at most")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--work", help="folder for the converted SmolLM2 (default: a temporary one)")
  ap.add_argument("--out", default="bench/results/quantize_cpu2", help="writes OUT.json and OUT.md")
  ap.add_argument("--markdown-only", action="store_true", help="rewrite OUT.md from OUT.json, measure nothing")
  args = ap.parse_args()
  if args.markdown_only:
    with open(args.out + ".json") as f, open(args.out + ".md", "w") as md:
      md.write(markdown(json.load(f)))
    return
  args.batches = [int(b) for b in args.batches.split(",")]

  results = {"machine": machine(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             "repeats": args.repeats, "models": {}}
  with tempfile.TemporaryDirectory() as tmp:
    work = args.work or tmp
    for name in args.models.split(","):
      t0 = time.perf_counter()
      r = bench_100m(args) if name == "100m" else bench_smollm2(args, work)
      r["bench_s"] = round(time.perf_counter() - t0, 1)
      results["models"]["llama_100m (random)" if name == "100m" else "SmolLM2-135M-Instruct"] = r
      with open(args.out + ".json", "w") as f:  # after each model: a partial run keeps what it measured
        json.dump(results, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(markdown(results))
  print(markdown(results))


if __name__ == "__main__":
  main()
