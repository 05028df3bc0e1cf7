"""A bounded load test of an OpenAI-compatible chat server, with the official `openai` client.

    python -m llasm_jax.serve.loadtest --url http://127.0.0.1:8000 --model NAME --requests 64 --concurrency 32

Each request is a streamed greedy chat completion. The requests run one at a time (the
baseline, and each request's reference answer), then `concurrency` clients at once (both after
an untimed warm-up pass, unless --no-warmup). Every
concurrent answer must equal its reference. The report gives tokens/s and requests/s of both
runs, their ratio, and p50 / p99 of the latency and of the time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import time
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class Outcome:
  text: str
  tokens: int
  latency_s: float
  ttft_s: float


def audio_part(path: str) -> dict[str, Any]:
  """An `input_audio` content part holding the file at `path`."""
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode()
  return {"type": "input_audio", "input_audio": {"data": data, "format": path.rsplit(".", 1)[-1].lower()}}


async def _one(client, model: str, messages, max_tokens: int, timeout_s: float) -> Outcome:
  t0 = time.perf_counter()
  ttft, pieces, tokens = None, [], 0
  stream = await client.chat.completions.create(
      model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
      stream_options={"include_usage": True}, timeout=timeout_s)
  async for chunk in stream:
    if chunk.usage is not None:
      tokens = chunk.usage.completion_tokens
    for choice in chunk.choices:
      if choice.delta.content:
        ttft = ttft if ttft is not None else time.perf_counter() - t0
        pieces.append(choice.delta.content)
  latency = time.perf_counter() - t0
  return Outcome("".join(pieces), tokens, latency, latency if ttft is None else ttft)


def _stats(outcomes: Sequence[Outcome], wall_s: float) -> dict[str, float]:
  lat = np.array([o.latency_s for o in outcomes])
  ttft = np.array([o.ttft_s for o in outcomes])
  tokens = sum(o.tokens for o in outcomes)
  return {"requests": len(outcomes), "wall_s": wall_s, "tokens": tokens, "tokens_per_s": tokens / wall_s,
          "requests_per_s": len(outcomes) / wall_s,
          "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
          "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99))}


async def run(url: str, model: str, conversations: Sequence[list[dict]], *, concurrency: int = 32,
              max_tokens: int = 32, time_limit_s: float = 600.0, warmup: bool = True) -> dict[str, Any]:
  """Sequential then concurrent runs of `conversations` against `url`; raises TimeoutError past
  `time_limit_s` (all runs together). With `warmup`, an untimed concurrent pass and one request
  first (a server compiles a prefill per batch and length bucket on first use; the measured
  passes are its steady state). The report's "mismatches" lists requests whose concurrent
  answer differs from the one-at-a-time answer."""
  import openai

  client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
  deadline = time.perf_counter() + time_limit_s

  def left() -> float:
    rest = deadline - time.perf_counter()
    if rest <= 0:
      raise TimeoutError(f"the load test ran past its {time_limit_s:.0f} s limit")
    return rest

  gate = asyncio.Semaphore(concurrency)

  async def client_task(messages):
    async with gate:
      return await _one(client, model, messages, max_tokens, left())

  try:
    if warmup:  # untimed: a server compiles a prefill per batch size and length bucket on first use
      await asyncio.wait_for(asyncio.gather(*(client_task(m) for m in conversations)), left())
      await client_task(conversations[0])
    t0 = time.perf_counter()
    alone = []
    for messages in conversations:
      alone.append(await asyncio.wait_for(_one(client, model, messages, max_tokens, left()), left()))
    alone_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    together = await asyncio.wait_for(asyncio.gather(*(client_task(m) for m in conversations)), left())
    together_s = time.perf_counter() - t0
  finally:
    await client.close()
  one, many = _stats(alone, alone_s), _stats(together, together_s)
  return {"concurrency": concurrency, "max_tokens": max_tokens, "one_at_a_time": one, "concurrent": many,
          "throughput_ratio": many["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else 0.0,
          "mismatches": [i for i, (a, b) in enumerate(zip(alone, together)) if a.text != b.text]}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--url", default="http://127.0.0.1:8000")
  p.add_argument("--model", required=True)
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--concurrency", type=int, default=32)
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--audio", action="append", default=[], help="audio files; requests cycle through them")
  p.add_argument("--time-limit", type=float, default=600.0)
  p.add_argument("--no-warmup", dest="warmup", action="store_false")
  args = p.parse_args(argv)
  conversations = [[{"role": "user", "content": [
      *([audio_part(args.audio[i % len(args.audio)])] if args.audio else []),
      {"type": "text", "text": f"Request {i}: say something about the number {i}."}]}] for i in range(args.requests)]
  report = asyncio.run(run(args.url, args.model, conversations, concurrency=args.concurrency,
                           max_tokens=args.max_tokens, time_limit_s=args.time_limit,
                           warmup=args.warmup))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
