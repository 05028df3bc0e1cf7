"""Batched generation from token ids and audio: jitted prefill and decode loop over a preallocated KV cache.

Legend: B batch, T prompt length, S cache slots, N audios in a batch, A audio slots per
prompt, P audio tokens per audio, M mel bins, F mel frames, D LLM width, V vocab.

Shapes are bucketed (B, T, S, N, A, F round up), so each jitted function compiles once per
bucket: the decode loop is a `lax.while_loop` whose carry holds the cache, so its
compilations do not grow with the number of generated tokens, and the number of steps per
call is a traced scalar (one call to the end, or short chunks for streaming and stop strings,
with the same executable). Prompts are left-padded, so every row writes the same cache slot;
RoPE positions come from the attention mask. The functions run on one device or sharded on a
mesh (`mesh.MeshFunctions`); a Llasm's audio becomes embeddings in `audio_embed.AudioEmbedder`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llasm_jax.errors import UserError
from llasm_jax.infer.audio_embed import AudioEmbedder, AudioFeatures, host_slots
from llasm_jax.infer.mesh import MeshFunctions, bucket
from llasm_jax.infer.sampling import SamplingParams, sample
from llasm_jax.layers import KVCache
from llasm_jax.layers.stack import unstack_layers
from llasm_jax.models.llama import LlamaForCausalLM
from llasm_jax.models.llasm import Llasm, splice

@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries; donated from call to call so the cache stays in place.

  cache:     the KV cache, S slots (prompt bucket first, then generated tokens); a buffer per
             layer with `Engine.unstack_decode`
  tokens:    int32[B, S] generated tokens, `pad_id` after a row stopped
  length:    int32[]     tokens generated so far (rows step together)
  last:      int32[B]    the newest token, the next decode input
  positions: int32[B]    RoPE position of `last` (its row's count of real tokens before it)
  done:      bool[B]     rows that stopped (EOS, stop string, or batch padding)
  rng:       key[]       sampling key, split once per step
  """

  cache: KVCache
  tokens: jax.Array
  length: jax.Array
  last: jax.Array
  positions: jax.Array
  done: jax.Array
  rng: jax.Array


@dataclasses.dataclass
class EngineOutput:
  """One prompt's result. token_ids: generated ids, ending with the EOS id when it stopped there."""

  token_ids: list[int]
  prompt_token_ids: list[int]
  finish_reason: str  # "eos", "stop" (the callback asked) or "length"


@dataclasses.dataclass
class Timings:
  """Seconds of each phase of one `generate` call (compilation included on a bucket's first call)."""

  audio_s: float = 0.0  # Whisper (+ decoder queries in "llasm" mode) and adaptor, once per audio
  prefill_s: float = 0.0  # the LLM over the prompts, filling the cache, first token
  decode_s: float = 0.0  # every later token
  decode_steps: int = 0  # decode steps run (rows step together)
  batch: int = 0  # real prompts
  generated_tokens: int = 0  # over all real rows, after truncation at EOS

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens per second of the decode phase, over all rows (the first token is prefill's)."""
    return self.batch * self.decode_steps / self.decode_s if self.decode_s else 0.0

  def as_dict(self) -> dict[str, float]:
    return {**dataclasses.asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}


# Callback after prefill and after each decode chunk: every real row's tokens so far
# (cut after EOS) -> rows that should stop now (stop strings), or None.
StepCallback = Callable[[list[list[int]]], Sequence[bool] | None]



class Engine:
  """Generation for a `LlamaForCausalLM` or a `Llasm`, on one device or on `mesh`.

  The model's parameters are split once (`nnx.split`); pure functions merge them inside jit.
  fns: the jitted functions, shardings and transfers (`mesh.MeshFunctions`); audio: a Llasm's
  `AudioEmbedder` (None for a text-only LLM), which shares them.

  unstack_decode: generate from a copy of the LLM whose layers hold their own arrays
  (`decode_graphdef`, `decode_state`, made once) and with a KV cache of one buffer per layer
  (`KVCache.unstack`), instead of slices of the stacks; None = on XLA:CPU only. XLA:CPU copies a
  layer's slice of a stacked array before every dot that reads it, so a decode step read each
  weight three times (and copied each layer's cache); unstacked, once. The copy of the layer
  weights is memory the engine holds in addition to the model's.
  """

  def __init__(self, model: LlamaForCausalLM | Llasm, *, mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, object]] | None = None, eos_ids: Sequence[int] | None = None,
               pad_id: int | None = None, unstack_decode: bool | None = None):
    if not isinstance(model, (LlamaForCausalLM, Llasm)):
      raise UserError(f"cannot generate with a {type(model).__name__}; pass a LlamaForCausalLM or a Llasm "
                       "(a Whisper-only checkpoint has no LLM)")
    self.fns = MeshFunctions(mesh, rules)
    self.mesh, self.rules, self.traces = self.fns.mesh, self.fns.rules, self.fns.traces
    self.audio_cfg = model.cfg if isinstance(model, Llasm) else None
    cfg = (model.llm if isinstance(model, Llasm) else model).cfg
    self.eos_ids = tuple(int(e) for e in ([cfg.eos_token_id] if eos_ids is None else eos_ids))
    self.pad_id = int(pad_id if pad_id is not None else cfg.pad_token_id if cfg.pad_token_id is not None
                      else (self.eos_ids or (0,))[0])
    self.unstack_decode = jax.default_backend() == "cpu" if unstack_decode is None else bool(unstack_decode)
    self.graphdef = nnx.graphdef(model)
    self.audio: AudioEmbedder | None = None
    self.update_params(model)

  def update_params(self, model: LlamaForCausalLM | Llasm) -> None:
    """Takes the parameters of `model`, the same architecture with new values (a training run
    evaluating as it goes): same shapes and shardings, so nothing compiles again. Remembered
    audio embeddings are dropped, since the adaptor changed."""
    if nnx.graphdef(model) != self.graphdef:
      raise UserError("update_params needs a model of the same architecture as the engine's")
    self.fns.place(model)
    self.graphdef = nnx.graphdef(model)
    self.model = model
    self.llm = model.llm if isinstance(model, Llasm) else model
    self.llm_graphdef, self.llm_state = nnx.split(self.llm)
    self._split_decode()
    if self.audio is not None:
      self.audio.update(model)
    elif isinstance(model, Llasm):
      self.audio = AudioEmbedder(self.fns, model)

  def _split_decode(self) -> None:
    """`decode_graphdef`, `decode_state`: the LLM that prefill and decode run, its layers unstacked
    (their own arrays, copied once) with `unstack_decode`, else `llm_graphdef`, `llm_state`."""
    self.decode_graphdef, self.decode_state = self.llm_graphdef, self.llm_state
    if self.unstack_decode:
      with self.fns.tracing():
        self.decode_graphdef, self.decode_state = nnx.split(
            unstack_layers(nnx.merge(self.llm_graphdef, self.llm_state)))

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty KV cache in the form the decode copy of the LLM reads (a buffer per layer with
    `unstack_decode`)."""
    cache = self.llm.init_cache(batch, max_len)
    return cache.unstack() if self.unstack_decode else cache

  def cache_shardings(self, per_row: bool = False) -> KVCache | None:
    """Shardings of the decode KV cache (`KVCache.logical_axes`; index int32[B] `per_row`). The
    slots are never split: rows write at dynamic slots."""
    c = self.llm.cfg
    size = dict(layers=c.num_hidden_layers, batch=self.fns.batch_multiple, act_kv_heads=c.num_key_value_heads,
                length=1, head_dim=c.kv_head_dim)
    return KVCache.logical_axes(c.num_hidden_layers, unstacked=self.unstack_decode, per_row=per_row,
                                fn=lambda axes: self.fns.logical(axes, [size[a] for a in axes]))

  def _decode_state_shardings(self) -> DecodeState:
    rows, rep = self.fns.logical(("batch",)), self.fns.replicated()
    return DecodeState(cache=self.cache_shardings(), tokens=self.fns.logical(("batch", "length")),
                       length=rep, last=rows, positions=rows, done=rows, rng=rep)

  def is_eos(self, token: jax.Array) -> jax.Array:
    """bool[...] of int32[...] tokens: one of `eos_ids` (traced)."""
    if not self.eos_ids:
      return jnp.zeros(token.shape, bool)
    return jnp.isin(token, jnp.asarray(self.eos_ids, jnp.int32))

  def embed(self, llm, input_ids: jax.Array, audio) -> jax.Array:
    """The LLM's input embeddings float[B, T, D] of input_ids int32[B, T], with audio None or
    (embeds float[N, P, D], valid bool[N, P], slots int32[B, A] indexing N, -1 = empty) spliced
    over the audio patch tokens (traced)."""
    embeds = llm.embed(input_ids)
    if audio is None:
      return embeds
    audio_embeds, audio_valid, slots = audio
    idx = jnp.maximum(slots, 0)
    return splice(embeds, input_ids, audio_embeds[idx], audio_valid[idx] & (slots >= 0)[..., None],
                  self.audio_cfg.audio_patch_id)

  # ---- pure functions (traced) -----------------------------------------------------------

  def _prefill_fn(self, llm_state, input_ids, attention_mask, active, audio, rng, temperature, top_k, top_p,
                  *, max_len: int, greedy: bool) -> DecodeState:
    """input_ids int32[B, T] left-padded, attention_mask bool[B, T], active bool[B] (False for
    batch padding), audio None or packed (see `embed`) -> the decode state after the first
    generated token."""
    self.traces["prefill"] += 1
    llm = nnx.merge(self.decode_graphdef, llm_state)
    b, t = input_ids.shape
    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    hidden, cache = llm(inputs_embeds=self.embed(llm, input_ids, audio), positions=positions,
                        attention_mask=attention_mask, cache=self.init_cache(b, max_len), return_hidden=True)
    # Left padding puts every row's last prompt token at T - 1: logits of that position only.
    rng, key = jax.random.split(rng)
    first = sample(llm.logits(hidden[:, -1:])[:, 0], key, temperature, top_k, top_p, greedy=greedy)
    done = ~active | self.is_eos(first)
    tokens = jnp.full((b, max_len), self.pad_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(cache=cache, tokens=tokens, length=jnp.int32(1), last=first,
                       positions=jnp.sum(attention_mask, axis=1, dtype=jnp.int32), done=done, rng=rng)

  def _decode_fn(self, llm_state, ds: DecodeState, until, stop, temperature, top_k, top_p, *, greedy: bool):
    """Runs decode steps while ds.length < until (int32[]) and some row is not done; stop bool[B]
    marks rows the host stopped (stop strings)."""
    self.traces["decode"] += 1

    def step(ds: DecodeState) -> DecodeState:
      llm = nnx.merge(self.decode_graphdef, llm_state)
      b = ds.last.shape[0]
      hidden, cache = llm(ds.last[:, None], positions=ds.positions[:, None], attention_mask=jnp.ones((b, 1), bool),
                          cache=ds.cache, return_hidden=True)
      rng, key = jax.random.split(ds.rng)
      token = sample(llm.logits(hidden)[:, 0], key, temperature, top_k, top_p, greedy=greedy)
      token = jnp.where(ds.done, self.pad_id, token)
      tokens = jax.lax.dynamic_update_slice(ds.tokens, token[:, None], (0, ds.length))
      return DecodeState(cache=cache, tokens=tokens, length=ds.length + 1, last=token,
                         positions=ds.positions + 1, done=ds.done | self.is_eos(token), rng=rng)

    ds = ds.replace(done=ds.done | stop)
    return jax.lax.while_loop(lambda ds: (ds.length < until) & ~jnp.all(ds.done), step, ds)

  # ---- host side -------------------------------------------------------------------------

  def check_audio(self, prompts: list[list[int]], mels: list[list[np.ndarray | AudioFeatures]] | None,
                  text_only_hint: str = " (pass audios=None)") -> None:
    """Raises UserError unless `mels` (per prompt its audio slots; None: none) fit the prompts:
    shapes the model reads, one marker span per audio, no audio for a text-only LLM."""
    if mels is not None and any(len(row) for row in mels):
      if self.audio is None:
        raise UserError(f"this checkpoint is a text-only LLM; it cannot take audio{text_only_hint}")
      self.audio.check(prompts, mels)
    elif self.audio is not None:  # markers without audio are an input error too
      self.audio.check(prompts, [[]] * len(prompts))

  def _pad_prompts(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded input_ids int32[B, T], attention mask bool[B, T] and active rows bool[B], with B
    and T bucketed and B a multiple of the devices the batch is split over."""
    real = len(prompts)
    rows = self.fns.rows(real)
    t = bucket(max(map(len, prompts)))
    input_ids = np.full((rows, t), self.pad_id, np.int32)
    mask = np.zeros((rows, t), bool)
    for b in range(rows):
      p = prompts[b] if b < real else [self.pad_id]  # batch padding: one token, never read
      input_ids[b, t - len(p):] = p
      mask[b, t - len(p):] = True
    return input_ids, mask, np.arange(rows) < real

  def _functions(self, max_len: int, greedy: bool, with_audio: bool):
    """The jitted prefill and decode of a cache of `max_len` slots, and the shardings of their
    host inputs ("table" [B, T], "rows" [B], "scalar", "audio": embeds, valid, slots; None on one device)."""
    fns = self.fns
    sh = dict(table=fns.logical(("batch", "length")), rows=fns.logical(("batch",)), scalar=fns.replicated(),
              audio=(fns.logical(("batch", None, "act_embed")), fns.logical(("batch", None)),
                     fns.logical(("batch", None))))
    prefill_in = decode_in = ds_sh = None
    if self.mesh is not None:
      llm_sh = fns.shardings_of(self.decode_state)
      ds_sh = self._decode_state_shardings()
      sampling_sh = (sh["scalar"],) * 3
      prefill_in = (llm_sh, sh["table"], sh["table"], sh["rows"], sh["audio"] if with_audio else None, sh["scalar"],
                    *sampling_sh)
      decode_in = (llm_sh, ds_sh, sh["scalar"], sh["rows"], *sampling_sh)
    # With and without audio the inputs differ in structure, hence in shardings: two functions.
    prefill = fns.jit("prefill_audio" if with_audio else "prefill", self._prefill_fn, prefill_in, ds_sh,
                      max_len=max_len, greedy=greedy)
    decode = fns.jit("decode", self._decode_fn, decode_in, ds_sh, donate=(1,), greedy=greedy)
    return prefill, decode, sh

  def generate(
      self,
      prompts: Sequence[Sequence[int]],
      mels: Sequence[Sequence[np.ndarray]] | None = None,
      *,
      max_new_tokens: int = 64,
      sampling: SamplingParams = SamplingParams(),
      callback: StepCallback | None = None,
      chunk_tokens: int | None = None,
  ) -> tuple[list[EngineOutput], Timings]:
    """Generates up to `max_new_tokens` tokens after each prompt.

    prompts: token ids per prompt (audio markers included for a Llasm), any lengths.
    mels: per prompt, a list of Whisper log-mel features float[M, F_i] or cached Whisper outputs
      (`AudioFeatures`), one per `<au_start>` span, in order; or None for text only.
    callback: called after prefill and after every `chunk_tokens` decode steps (default: 1
      step with a callback, else all at once) with each row's tokens so far; rows it returns
      True for stop there ("stop"). Chunks reuse one compiled loop.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
      raise UserError("no prompts given")
    if max_new_tokens < 1:
      raise UserError(f"max_new_tokens {max_new_tokens}: expected >= 1")
    cfg = self.llm.cfg
    for i, p in enumerate(prompts):
      if not p:
        raise UserError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
      bad = [t for t in p if not 0 <= t < cfg.vocab_size]
      if bad:
        raise UserError(f"prompt {i}: token id {bad[0]} is outside the vocab (size {cfg.vocab_size})")
    real = len(prompts)
    timings = Timings(batch=real)
    input_ids, mask, active = self._pad_prompts(prompts)
    rows, t = input_ids.shape
    max_len = bucket(t + max_new_tokens)

    audio = None
    if mels is not None and any(len(m) for m in mels):
      mels = [host_slots(row) for row in mels]
      self.check_audio(prompts, mels)
      audio = self.audio.pack(mels, rows, timings)
    else:
      self.check_audio(prompts, None)

    prefill, decode, sh = self._functions(max_len, sampling.greedy, audio is not None)
    params = sampling.arrays()
    rng = jax.random.key(sampling.seed)
    put, get = self.fns.put, self.fns.get

    with self.fns.tracing():
      t0 = time.perf_counter()
      if audio is not None:
        audio = tuple(put(a, s) for a, s in zip(audio, sh["audio"]))
      ds = prefill(self.decode_state, put(input_ids, sh["table"]), put(mask, sh["table"]),
                   put(active, sh["rows"]), audio, rng, *params)
      length, done, tokens = get(ds.length), get(ds.done), get(ds.tokens)
      timings.prefill_s = time.perf_counter() - t0

      stopped = np.zeros(rows, bool)
      stop_at = np.full(real, max_new_tokens)  # where the callback stopped each row
      chunk = chunk_tokens or (1 if callback else max_new_tokens)
      t0 = time.perf_counter()
      while True:
        outs = [_cut(tokens[b, :min(int(length), stop_at[b])], self.eos_ids) for b in range(real)]
        if callback is not None:
          flags = callback(outs)
          if flags is not None:
            new = np.asarray(flags, bool) & ~done[:real] & ~stopped[:real]
            stop_at[new] = int(length)
            stopped[:real] |= new
        if int(length) >= max_new_tokens or np.all(done | stopped):
          break
        until = min(int(length) + chunk, max_new_tokens)
        ds = decode(self.decode_state, ds, put(np.int32(until), sh["scalar"]), put(stopped, sh["rows"]), *params)
        length, done, tokens = get(ds.length), get(ds.done), get(ds.tokens)
      timings.decode_s = time.perf_counter() - t0
      timings.decode_steps = int(length) - 1

    results = []
    for b in range(real):
      ids = outs[b]
      reason = "eos" if ids and ids[-1] in self.eos_ids else "stop" if stopped[b] else "length"
      results.append(EngineOutput(token_ids=ids, prompt_token_ids=prompts[b], finish_reason=reason))
    timings.generated_tokens = sum(len(r.token_ids) for r in results)
    return results, timings


def _cut(tokens: np.ndarray, eos_ids: tuple[int, ...]) -> list[int]:
  """Tokens up to and including the first EOS."""
  out = []
  for tok in tokens.tolist():
    out.append(tok)
    if tok in eos_ids:
      break
  return out
