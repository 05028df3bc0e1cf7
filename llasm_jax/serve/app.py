"""The OpenAI-compatible HTTP API over a `Scheduler` (FastAPI on uvicorn).

    POST /v1/chat/completions      messages with text and `input_audio` parts; `stream` sends
                                   server-sent events in OpenAI's chunk shape, then `[DONE]`
    POST /v1/audio/transcriptions  multipart `file` (+ `model`, `prompt`, `response_format`)
    GET  /v1/models                the one model served
    GET  /health                   slots, running, waiting, and counters

Every error is an OpenAI error object, `{"error": {"message", "type", "param", "code"}}`, with a
4xx status for the client's mistakes (400 malformed or invalid, 404 unknown model, 413 audio too
large, 429 queue full with `Retry-After`) and 500 for ours; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import tempfile
import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llasm_jax.data import audio as audio_io
from llasm_jax.data import templates
from llasm_jax.errors import UserError
from llasm_jax.infer.sampling import SamplingParams
from llasm_jax.serve.scheduler import Delta, Failed, Finished, QueueFull, Scheduler

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm", "pcm16")


class ApiError(Exception):
  """An error to send back as an OpenAI error object."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers

  def response(self) -> JSONResponse:
    body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
    return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- request bodies (unknown fields are ignored, as OpenAI's own optional ones) -------------


class _Body(BaseModel):
  model_config = ConfigDict(extra="ignore")


class InputAudio(_Body):
  data: str  # base64 of the file's bytes
  format: str = "wav"


class ContentPart(_Body):
  type: Literal["text", "input_audio"]
  text: str | None = None
  input_audio: InputAudio | None = None


class Message(_Body):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
  include_usage: bool = False


class ChatRequest(_Body):
  model: str
  messages: list[Message] = Field(min_length=1)
  stream: bool = False
  stream_options: StreamOptions | None = None
  max_tokens: int | None = Field(default=None, ge=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)
  temperature: float | None = Field(default=None, ge=0.0, le=2.0)
  top_p: float | None = Field(default=None, gt=0.0, le=1.0)
  top_k: int | None = Field(default=None, ge=0)  # not OpenAI's; vLLM and llama.cpp take it too
  stop: str | list[str] | None = None
  seed: int | None = None
  n: int = Field(default=1, ge=1)


# ---- the app -------------------------------------------------------------------------------


def create_app(scheduler: Scheduler, *, model_name: str, max_audio_bytes: int = 25 * 2**20,
               max_audio_seconds: float = 300.0, default_max_tokens: int = 512) -> FastAPI:
  """The ASGI app. The scheduler's thread starts with the app and stops with it."""
  generator = scheduler.generator
  created = int(time.time())

  async def lifespan(app):
    scheduler.start()
    yield
    scheduler.stop()

  app = FastAPI(title="llasm-jax", lifespan=lifespan)

  @app.exception_handler(ApiError)
  async def _api_error(request, e: ApiError):
    return e.response()

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    where = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
      message = f"the request body is not valid JSON ({first.get('msg', '')}); send a JSON object"
    else:
      message = f"{where}: {first.get('msg', 'invalid')}" + (f" (got {first['input']!r})" if "input" in first and
                                                              len(repr(first["input"])) < 200 else "")
    return ApiError(400, message, param=where).response()

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e: StarletteHTTPException):
    return ApiError(e.status_code, str(e.detail), kind="invalid_request_error" if e.status_code < 500
                    else "server_error").response()

  @app.exception_handler(Exception)
  async def _internal(request, e: Exception):
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()

  def check_model(name: str) -> None:
    if name != model_name:
      raise ApiError(404, f"model {name!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
                     param="model", code="model_not_found")

  def decode_audio(data: bytes, fmt: str, param: str) -> np.ndarray:
    """Bytes of an audio file -> 16 kHz mono float32 samples; raises ApiError naming `param`."""
    if len(data) > max_audio_bytes:
      raise ApiError(413, f"{param}: {len(data) / 2**20:.1f} MiB of audio exceed the {max_audio_bytes / 2**20:.0f} MiB "
                     "limit; send a shorter clip", param=param, code="audio_too_large")
    if not data:
      raise ApiError(400, f"{param}: no audio bytes", param=param, code="invalid_audio")
    if fmt == "pcm16":  # raw little-endian int16 at 16 kHz, as OpenAI's realtime API sends
      samples = np.frombuffer(data[:len(data) // 2 * 2], "<i2").astype(np.float32) / 32768
    else:
      with tempfile.NamedTemporaryFile(suffix="." + fmt) as f:
        f.write(data)
        f.flush()
        try:
          samples = audio_io.load_audio(f.name)
        except UserError as e:
          raise ApiError(400, f"{param}: the {fmt} audio cannot be decoded ({_detail(e)}); send wav, flac, mp3 or ogg",
                         param=param, code="invalid_audio") from None
    if samples.size == 0:
      raise ApiError(400, f"{param}: the audio holds no samples", param=param, code="invalid_audio")
    seconds = samples.size / audio_io.SAMPLE_RATE
    if seconds > max_audio_seconds:
      raise ApiError(400, f"{param}: {seconds:.0f} s of audio exceed the {max_audio_seconds:.0f} s limit",
                     param=param, code="audio_too_long")
    return samples

  def plain_text(text: str, param: str) -> str:
    for marker in (*templates.MARKERS, templates.AUDIO):
      if marker in text:
        raise ApiError(400, f"{param}: the text holds the reserved marker {marker!r}; send audio as an "
                       "input_audio part", param=param)
    return text

  def conversation(messages: list[Message]) -> tuple[list[dict[str, str]], list[np.ndarray]]:
    """OpenAI messages -> ours (audio parts as `<audio>` placeholders) and their audios in order."""
    out, audios = [], []
    for i, m in enumerate(messages):
      role = "system" if m.role == "developer" else m.role
      if isinstance(m.content, list):
        pieces = []  # joined by newlines: an audio then a question reads as `generate --audio A --prompt Q`
        for j, part in enumerate(m.content):
          param = f"messages.{i}.content.{j}"
          if part.type == "text":
            if part.text is None:
              raise ApiError(400, f"{param}: a text part needs `text`", param=param)
            pieces.append(plain_text(part.text, param))
          else:
            if part.input_audio is None:
              raise ApiError(400, f"{param}: an input_audio part needs `input_audio` {{data, format}}", param=param)
            if role != "user":
              raise ApiError(400, f"{param}: audio belongs to user messages, not {role}", param=param)
            fmt = part.input_audio.format.lower()
            if fmt not in AUDIO_FORMATS:
              raise ApiError(400, f"{param}.input_audio.format: {fmt!r}; expected one of {', '.join(AUDIO_FORMATS)}",
                             param=param + ".input_audio.format", code="invalid_audio")
            try:
              data = base64.b64decode(part.input_audio.data, validate=True)
            except (binascii.Error, ValueError):
              raise ApiError(400, f"{param}.input_audio.data: not base64", param=param + ".input_audio.data",
                             code="invalid_audio") from None
            audios.append(decode_audio(data, fmt, param + ".input_audio"))
            pieces.append(templates.AUDIO)
        text = "\n".join(pieces)
      else:
        text = plain_text(m.content or "", f"messages.{i}.content")
      out.append({"role": role, "content": text})
    return out, audios

  def prepare(messages, audios) -> tuple[list[int], list[np.ndarray]]:
    if audios and generator.cfg is None:
      raise ApiError(400, f"model {model_name!r} is a text-only LLM; it cannot take input_audio", param="messages")
    try:
      return generator.prepare(messages, audios)
    except UserError as e:
      raise ApiError(400, str(e), param="messages") from None

  def submit(ids, mels, body_max: int | None, sampling: SamplingParams, stop: list[str]):
    room = scheduler.engine.max_len - len(ids)
    if room < 1:
      raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's slots hold {scheduler.engine.max_len} "
                     "tokens (prompt + reply): shorten the conversation", param="messages",
                     code="context_length_exceeded")
    max_new = body_max or min(default_max_tokens, room)
    if max_new > room:
      raise ApiError(400, f"max_tokens {max_new} + the prompt's {len(ids)} tokens exceed this server's "
                     f"{scheduler.engine.max_len}-token slots; ask for at most {room}", param="max_tokens",
                     code="context_length_exceeded")
    try:
      return scheduler.submit(ids, mels, max_new_tokens=max_new, sampling=sampling, stop=stop)
    except QueueFull as e:
      raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full",
                     headers={"Retry-After": str(e.retry_after)}) from None
    except UserError as e:
      raise ApiError(400, str(e), param="messages") from None

  async def collect(job, request: Request) -> Finished:
    """Waits for a job's end. A client that disconnects meanwhile cancels it (its slot is freed at
    the scheduler's next step): uvicorn does not cancel the handler, so a task waits for the
    connection's `http.disconnect`, as Starlette's streaming responses do."""

    async def watch():
      while (await request.receive())["type"] != "http.disconnect":
        pass
      job.cancel()

    watcher = asyncio.create_task(watch())
    try:
      async for event in job.events():
        if isinstance(event, Failed):
          raise ApiError(500, event.message, kind="server_error")
        if isinstance(event, Finished):
          return event
      raise ApiError(500, "the job ended without a result", kind="server_error")
    finally:
      watcher.cancel()
      if not job.done:
        job.cancel()

  def usage(done: Finished) -> dict[str, int]:
    n = len(done.token_ids)
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": n, "total_tokens": done.prompt_tokens + n}

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, **scheduler.health()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "llasm-jax"}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatRequest, request: Request):
    check_model(body.model)
    if body.n != 1:
      raise ApiError(400, f"n {body.n}: this server returns one choice per request (n=1)", param="n")
    messages, audios = await run_in_threadpool(conversation, body.messages)
    ids, mels = await run_in_threadpool(prepare, messages, audios)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    temperature = 1.0 if body.temperature is None else body.temperature
    seed = body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little")
    try:
      sampling = SamplingParams(temperature=temperature, top_k=body.top_k or 0,
                                top_p=1.0 if body.top_p is None else body.top_p, seed=seed)
    except UserError as e:
      raise ApiError(400, str(e)) from None
    job = submit(ids, mels, body.max_completion_tokens or body.max_tokens, sampling, stop)
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
      done = await collect(job, request)
      return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                           "finish_reason": done.reason, "logprobs": None}],
              "usage": usage(done)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def sse(body_: dict[str, Any]) -> str:
      return f"data: {json.dumps(body_, ensure_ascii=False)}\n\n"

    def chunk(choices: list, **extra) -> str:
      return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                  "choices": choices, **extra})

    def choice(delta: dict[str, Any], finish: str | None = None) -> list:
      return [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]

    async def stream():
      try:
        yield chunk(choice({"role": "assistant", "content": ""}))
        async for event in job.events():
          if isinstance(event, Delta) and event.text:
            yield chunk(choice({"content": event.text}))
          elif isinstance(event, Finished):
            yield chunk(choice({}, event.reason))
            if include_usage:  # OpenAI's last chunk: no choices, the usage
              yield chunk([], usage=usage(event))
          elif isinstance(event, Failed):  # the status line is sent already: an error event instead
            yield sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"
      finally:
        if not job.done:  # the client went away mid-stream
          job.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

  @app.post("/v1/audio/transcriptions")
  async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(...),
                           prompt: str | None = Form(None), response_format: str = Form("json"),
                           language: str | None = Form(None), temperature: float = Form(0.0)):
    check_model(model)
    if generator.cfg is None:
      raise ApiError(400, f"model {model_name!r} is a text-only LLM; it cannot transcribe", param="model")
    if response_format not in ("json", "text", "verbose_json"):
      raise ApiError(400, f"response_format {response_format!r}: expected json, text or verbose_json",
                     param="response_format")
    data = await file.read()
    fmt = os.path.splitext(file.filename or "")[1].lstrip(".").lower() or "wav"
    samples = await run_in_threadpool(decode_audio, data, fmt, "file")
    instruction = prompt or (templates.TRANSCRIBE_ZH[0] if (language or "").lower().startswith("zh")
                             else templates.TRANSCRIBE_EN[0])
    ids, mels = await run_in_threadpool(prepare, [{"role": "user", "content": templates.AUDIO + "\n" + instruction}],
                                        [samples])
    try:
      sampling = SamplingParams(temperature=temperature)
    except UserError as e:
      raise ApiError(400, str(e), param="temperature") from None
    done = await collect(submit(ids, mels, None, sampling, []), request)
    text = done.text.strip()
    if response_format == "text":
      return PlainTextResponse(text)
    out = {"text": text, "usage": {"type": "tokens", "input_tokens": done.prompt_tokens,
                                   "output_tokens": len(done.token_ids), "total_tokens": done.prompt_tokens + len(done.token_ids)}}
    if response_format == "verbose_json":
      out.update(task="transcribe", language=language or "", duration=samples.size / audio_io.SAMPLE_RATE)
    return out

  return app


def _detail(e: UserError) -> str:
  return getattr(e, "detail", None) or str(e)
