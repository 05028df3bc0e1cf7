"""Continuous batching: a fixed number of decode slots over one KV cache, each slot its own request.

Legend: B decode slots, S cache slots per row, k requests prefilled together, T their prompt
bucket, K decode steps per call, N audios, P audio tokens per audio, D LLM width, V vocab.

`Engine.generate` runs one batch from start to end: its rows step together and share one
cache index. Here every row is a request of its own, at its own length (`KVCache.index`
int32[B]), with its own sampling parameters, random key and token budget:

    slots = SlotEngine(engine, slots=8, max_len=1024)   # an `Engine` (or a model: one is made)
    [first] = slots.insert([SlotRequest(slot=3, prompt_ids=ids, max_new_tokens=64)])
    step = slots.step()          # K tokens of every slot; rows that were active emitted theirs
    slots.cancel([3])            # a stop string, a client gone: the slot is free again

`insert` prefills k new prompts together (right-padded, their audio encoded by the engine's
Whisper + adaptor, remembered per audio) into a small cache and copies it into the chosen
rows while the others keep their state; `step` runs K decode steps of all rows in one jitted
`lax.scan`, and rows stop on the device at EOS or at their budget. Both donate the slot state,
so the cache is updated in place. Shapes are fixed (B, S) or bucketed (k, T, N, P): a server
compiles a handful of executables and then never again.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llasm_jax.errors import UserError
from llasm_jax.infer.audio_embed import AudioFeatures, host_slots
from llasm_jax.infer.engine import Engine, Timings
from llasm_jax.infer.mesh import MeshFunctions, bucket
from llasm_jax.infer.sampling import SamplingParams, sample
from llasm_jax.layers import KVCache
from llasm_jax.models.llama import LlamaForCausalLM
from llasm_jax.models.llasm import Llasm


@flax.struct.dataclass
class SlotState:
  """Every decode slot on the device; donated from call to call so the cache stays in place.

  cache:       KV cache with index int32[B]: each row's next slot (= its real tokens so far)
  last:        int32[B]   each row's newest token, its next decode input
  active:      bool[B]    rows still generating (a free slot, or one that stopped, is not)
  generated:   int32[B]   tokens each row generated so far
  budget:      int32[B]   each row's max_new_tokens
  greedy:      bool[B]    rows that pick the argmax
  temperature: float32[B] sampling parameters of each row (read where not greedy)
  top_k:       int32[B]
  top_p:       float32[B]
  rng:         key[B]     each row's key, split once per token: a seeded request samples the
                          same tokens whatever else shares the batch
  """

  cache: KVCache
  last: jax.Array
  active: jax.Array
  generated: jax.Array
  budget: jax.Array
  greedy: jax.Array
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  rng: jax.Array


@dataclasses.dataclass
class SlotRequest:
  """One prompt to prefill into decode row `slot`. mels: its audio slots (log-mels float[M, F] or
  `AudioFeatures`), one per `<au_start>` span, in order."""

  slot: int
  prompt_ids: Sequence[int]
  mels: Sequence[np.ndarray | AudioFeatures] = ()
  max_new_tokens: int = 64
  sampling: SamplingParams = SamplingParams()


@dataclasses.dataclass
class Step:
  """What one `SlotEngine.step` produced, on the host.

  tokens:  int32[B, K] each row's tokens of the K steps
  emitted: bool[B, K]  the row was active when it produced that token (the rest is filler)
  active:  bool[B]     rows still generating after the call
  """

  tokens: np.ndarray
  emitted: np.ndarray
  active: np.ndarray


def sample_rows(logits, keys, greedy, temperature, top_k, top_p, *, any_sampled: bool):
  """float32[B, V] logits and per-row keys and parameters -> int32[B]. `any_sampled` is static:
  when every row is greedy the vocab sort of the filters is not compiled in."""
  argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not any_sampled:
    return argmax
  one = lambda l, k, t, tk, tp: sample(l[None], k, jnp.maximum(t, 1e-6), tk, tp, greedy=False)[0]
  return jnp.where(greedy, argmax, jax.vmap(one)(logits, keys, temperature, top_k, top_p))


class SlotEngine:
  """`slots` decode rows of up to `max_len` tokens each (prompt + generated), run by `engine` (an
  `Engine`, or a model with the `Engine` arguments `engine_kw`): its decode copy of the LLM and its
  audio embedder (remembered audios included) serve the slots too, nothing is copied. Rows are
  split over the mesh's batch axes. `chunk` decode steps run per `step` call: more amortizes the
  host round trip, fewer reacts sooner to stop strings and cancellations (streams still get every token)."""

  def __init__(self, engine: Engine | LlamaForCausalLM | Llasm, *, slots: int = 8, max_len: int = 1024,
               chunk: int = 4, **engine_kw):
    if not isinstance(engine, Engine):
      engine = Engine(engine, **engine_kw)
    elif engine_kw:
      raise UserError(f"{sorted(engine_kw)}: Engine arguments, for a model; an Engine has them already")
    # Jitted functions of its own (they close over slots and max_len), on the engine's mesh.
    self.engine, self.fns = engine, MeshFunctions(engine.mesh, engine.rules)
    self.traces = self.fns.traces
    self.model, self.eos_ids, self.pad_id = engine.model, engine.eos_ids, engine.pad_id
    if slots < 1 or max_len < 2 or chunk < 1:
      raise UserError(f"slots {slots}, max_len {max_len}, chunk {chunk}: expected slots >= 1, max_len >= 2, chunk >= 1")
    if slots % self.fns.batch_multiple:
      raise UserError(f"slots {slots}: the mesh splits rows over {self.fns.batch_multiple} devices; "
                       f"use a multiple of {self.fns.batch_multiple}")
    self.slots, self.max_len, self.chunk = slots, max_len, chunk
    self.greedy = np.ones(slots, bool)  # host copy: which rows are greedy (picks the compiled step)
    self._stop = np.zeros(slots, bool)  # rows `cancel` named, ended by the next step
    self.prefix_ids: list[int] = []  # `set_prefix`: the opening every prompt shares, prefilled once
    self._prefix: KVCache | None = None
    self.timings = Timings()
    self.slot_state = self._init_state()

  # ---- shardings -------------------------------------------------------------------------

  def _slot_shardings(self) -> SlotState | None:
    if self.fns.mesh is None:
      return None
    rows = self.fns.logical(("batch",))
    return SlotState(cache=self.engine.cache_shardings(per_row=True), last=rows, active=rows, generated=rows,
                     budget=rows, greedy=rows, temperature=rows, top_k=rows, top_p=rows, rng=rows)

  def _init_state(self) -> SlotState:
    def init():
      b = self.slots
      cache = self.engine.init_cache(b, self.max_len)  # as the engine's decode copy of the LLM reads it
      zeros = jnp.zeros((b,), jnp.int32)
      return SlotState(cache=cache.replace(index=zeros), last=zeros, active=jnp.zeros((b,), bool), generated=zeros,
                       budget=zeros, greedy=jnp.ones((b,), bool), temperature=jnp.zeros((b,), jnp.float32),
                       top_k=zeros, top_p=jnp.ones((b,), jnp.float32), rng=jax.random.split(jax.random.key(0), b))

    fn = self.fns.jit("slots_init", init, None if self.fns.mesh is None else (), self._slot_shardings())
    with self.fns.tracing():
      return fn()

  # ---- pure functions (traced) -----------------------------------------------------------

  def _insert_fn(self, llm_state, st: SlotState, prefix: KVCache | None, input_ids, lengths, rows, audio, budget,
                 greedy, temperature, top_k, top_p, seeds, *, any_sampled: bool) -> tuple[SlotState, jax.Array]:
    """input_ids int32[k, T] right-padded to `lengths` int32[k], into decode rows `rows` int32[k]
    (B = padding, dropped), after `prefix` (the cache of the shared opening, 1 row, or None); audio
    None or (embeds float[N, P, D], valid bool[N, P], slots int32[k, A]); per-request budget,
    sampling parameters and seeds [k] -> the new state and each request's first token int32[k]."""
    self.fns.traces["insert"] += 1
    llm = nnx.merge(self.engine.decode_graphdef, llm_state)
    k, t = input_ids.shape
    p = 0 if prefix is None else prefix.max_len
    mask = jnp.arange(t)[None] < lengths[:, None]
    embeds = self.engine.embed(llm, input_ids, audio)
    fresh = llm.init_cache(k, p + t, dtype=jax.tree.leaves(st.cache.k)[0].dtype)
    if prefix is not None:  # the shared opening's keys and values first, then these tokens after it
      every_row = lambda a: jnp.broadcast_to(a, (a.shape[0], k, *a.shape[2:]))  # [L, 1, ...] -> [L, k, ...]
      opening = prefix.replace(k=every_row(prefix.k), v=every_row(prefix.v))
      fresh = fresh.replace(index=jnp.zeros((k,), jnp.int32)).put_rows(jnp.arange(k), opening,
                                                                        jnp.full((k,), p, jnp.int32))
    hidden, fresh = llm(inputs_embeds=embeds, positions=p + jnp.broadcast_to(jnp.arange(t), (k, t)),
                        attention_mask=mask, cache=fresh, return_hidden=True)
    last_hidden = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    lengths = p + lengths  # the row's tokens: the prefix's and its own
    keys = jax.vmap(jax.random.key)(seeds)
    keys, first_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    first = sample_rows(llm.logits(last_hidden)[:, 0], first_keys, greedy, temperature, top_k, top_p,
                        any_sampled=any_sampled)
    put = lambda table, values: table.at[rows].set(values, mode="drop")
    cache = st.cache.put_rows(rows, fresh, lengths)
    active = ~self.engine.is_eos(first) & (budget > 1)
    st = SlotState(cache=cache, last=put(st.last, first), active=put(st.active, active),
                   generated=put(st.generated, jnp.ones_like(lengths)), budget=put(st.budget, budget),
                   greedy=put(st.greedy, greedy), temperature=put(st.temperature, temperature),
                   top_k=put(st.top_k, top_k), top_p=put(st.top_p, top_p), rng=put(st.rng, keys))
    return st, first

  def _step_fn(self, llm_state, st: SlotState, stop, *, steps: int, any_sampled: bool):
    """`steps` decode steps of every row; stop bool[B] ends rows first (the host's stop strings,
    cancellations). -> the new state, tokens int32[B, K] and emitted bool[B, K]."""
    self.fns.traces["step"] += 1
    llm = nnx.merge(self.engine.decode_graphdef, llm_state)  # per-layer weights and cache on XLA:CPU (`Engine`)

    def one(st: SlotState, _):
      index = st.cache.index
      hidden, cache = llm(st.last[:, None], positions=index[:, None], cache=st.cache, return_hidden=True)
      keys, step_keys = jnp.moveaxis(jax.vmap(jax.random.split)(st.rng), 1, 0)
      token = sample_rows(llm.logits(hidden)[:, 0], step_keys, st.greedy, st.temperature, st.top_k, st.top_p,
                          any_sampled=any_sampled)
      token = jnp.where(st.active, token, self.pad_id)
      generated = st.generated + st.active
      # A row that is not generating keeps its length: its writes land on a slot it never reads.
      cache = cache.replace(index=jnp.where(st.active, cache.index, index))
      active = st.active & ~self.engine.is_eos(token) & (generated < st.budget)
      new = st.replace(cache=cache, last=jnp.where(st.active, token, st.last), active=active, generated=generated,
                       rng=jnp.where(st.active, keys, st.rng))
      return new, (token, st.active)

    st = st.replace(active=st.active & ~stop)
    st, (tokens, emitted) = jax.lax.scan(one, st, None, length=steps)
    return st, tokens.T, emitted.T

  # ---- host side -------------------------------------------------------------------------

  def check(self, r: SlotRequest) -> None:
    """Raises UserError if `r` cannot run: bad ids, more tokens than a slot holds, audio that
    disagrees with the prompt's markers, audio for a text-only LLM."""
    if not 0 <= r.slot < self.slots:
      raise UserError(f"slot {r.slot}: expected 0..{self.slots - 1}")
    ids = list(r.prompt_ids)
    if not ids:
      raise UserError("an empty prompt; give at least one token (e.g. BOS)")
    vocab = self.engine.llm.cfg.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
      raise UserError(f"token id {bad[0]} is outside the vocab (size {vocab})")
    if r.max_new_tokens < 1:
      raise UserError(f"max_new_tokens {r.max_new_tokens}: expected >= 1")
    if len(ids) + r.max_new_tokens > self.max_len:
      raise UserError(f"{len(ids)} prompt tokens + {r.max_new_tokens} new tokens exceed the {self.max_len} "
                       "tokens of a decode slot; shorten the prompt or ask for fewer tokens (the server's --max-len)")
    self.engine.check_audio([ids], [host_slots(r.mels)], text_only_hint="")

  def set_prefix(self, ids: Sequence[int]) -> None:
    """Prefills `ids`, the opening most prompts share (a template's system block:
    `Template.fixed_prefix`), once; a prompt that starts with it then prefills only what follows."""
    ids = [int(t) for t in ids]
    if len(ids) >= self.max_len:
      raise UserError(f"a shared prefix of {len(ids)} tokens does not fit {self.max_len}-token slots")
    self.prefix_ids, self._prefix = ids, None
    if not ids:
      return

    def prefill(llm_state, input_ids):
      llm = nnx.merge(self.engine.decode_graphdef, llm_state)
      _, cache = llm(input_ids, cache=llm.init_cache(1, input_ids.shape[1]), return_hidden=True)
      return cache.stack()

    fns, state = self.fns, self.engine.decode_state
    fn = fns.jit("prefix", prefill, None if fns.mesh is None else (fns.shardings_of(state), fns.replicated()), None)
    with fns.tracing():
      self._prefix = fn(state, fns.put(np.asarray([ids], np.int32), fns.replicated()))

  def _has_prefix(self, r: SlotRequest) -> bool:
    n = len(self.prefix_ids)
    return bool(n) and len(r.prompt_ids) > n and list(r.prompt_ids[:n]) == self.prefix_ids

  def insert(self, requests: Sequence[SlotRequest]) -> list[int]:
    """Prefills `requests` into their slots (any state the slots held is dropped); returns each
    one's first token. Raises UserError (nothing inserted) if one is invalid."""
    if not requests:
      return []
    for r in requests:
      self.check(r)
    if len({r.slot for r in requests}) != len(requests):
      raise UserError("two requests for the same slot")
    first = {}
    for with_prefix in (True, False):  # at most two prefills: after the shared prefix, and whole prompts
      group = [i for i, r in enumerate(requests) if self._has_prefix(r) == with_prefix]
      if group:
        first.update(zip(group, self._insert([requests[i] for i in group], with_prefix)))
    return [first[i] for i in range(len(requests))]

  def _insert(self, requests: Sequence[SlotRequest], with_prefix: bool) -> list[int]:
    skip = len(self.prefix_ids) if with_prefix else 0
    for r in requests:
      self._stop[r.slot] = False  # a cancel of the slot's previous request
    k = bucket(len(requests), minimum=1)
    t = min(bucket(max(len(r.prompt_ids) - skip for r in requests)), self.max_len - skip)
    input_ids = np.full((k, t), self.pad_id, np.int32)
    lengths = np.ones((k,), np.int32)
    rows = np.full((k,), self.slots, np.int32)  # padding rows are dropped by the scatter
    budget, seeds = np.ones((k,), np.int32), np.zeros((k,), np.uint32)
    greedy, temperature = np.ones((k,), bool), np.zeros((k,), np.float32)
    top_k, top_p = np.zeros((k,), np.int32), np.ones((k,), np.float32)
    for i, r in enumerate(requests):
      ids = list(r.prompt_ids)[skip:]
      input_ids[i, :len(ids)], lengths[i], rows[i] = ids, len(ids), r.slot
      budget[i], seeds[i] = r.max_new_tokens, r.sampling.seed % 2**32
      s = r.sampling
      greedy[i], temperature[i], top_k[i], top_p[i] = s.greedy, s.temperature, max(s.top_k, 0), s.top_p
      self.greedy[r.slot] = s.greedy
    mels = [host_slots(r.mels) for r in requests]  # checked
    audio = self.engine.audio.pack(mels, k, self.timings) if any(mels) else None
    prefix = self._prefix if with_prefix else None
    fns, state = self.fns, self.engine.decode_state
    rep = fns.replicated()
    in_sh = out_sh = None
    if fns.mesh is not None:  # the new prompts are few: replicated; the slots keep their shardings
      in_sh = (fns.shardings_of(state), self._slot_shardings(), None if prefix is None else fns.shardings_of(prefix),
               rep, rep, rep, None if audio is None else (rep,) * 3, *(rep,) * 6)
      out_sh = (self._slot_shardings(), rep)
    name = "insert" + ("_audio" if audio is not None else "") + ("_prefix" if with_prefix else "")
    fn = fns.jit(name, self._insert_fn, in_sh, out_sh, donate=(1,), any_sampled=not greedy.all())
    with fns.tracing():
      if audio is not None:
        audio = tuple(fns.put(a, rep) for a in audio)
      arrays = [fns.put(a, rep) for a in (input_ids, lengths, rows)]
      params = [fns.put(a, rep) for a in (budget, greedy, temperature, top_k, top_p, seeds)]
      self.slot_state, first = fn(state, self.slot_state, prefix, *arrays, audio, *params)
    return fns.get(first)[:len(requests)].tolist()

  def step(self, stop: Sequence[int] = ()) -> Step:
    """`chunk` decode steps of every slot; rows in `stop` (and those `cancel` named) end first."""
    stop_rows = self._stop.copy()
    stop_rows[list(stop)] = True
    self._stop[:] = False
    fns, state = self.fns, self.engine.decode_state
    in_sh = out_sh = None
    if fns.mesh is not None:
      in_sh = (fns.shardings_of(state), self._slot_shardings(), fns.logical(("batch",)))
      out_sh = (self._slot_shardings(), fns.logical(("batch", None)), fns.logical(("batch", None)))
    fn = fns.jit("step", self._step_fn, in_sh, out_sh, donate=(1,), steps=self.chunk,
                 any_sampled=not self.greedy.all())
    with fns.tracing():
      self.slot_state, tokens, emitted = fn(state, self.slot_state, fns.put(stop_rows, in_sh and in_sh[2]))
    return Step(tokens=fns.get(tokens), emitted=fns.get(emitted), active=fns.get(self.slot_state.active))

  def cancel(self, rows: Sequence[int]) -> None:
    """Ends `rows` at the start of the next `step` (their slots are free for `insert` now)."""
    self._stop[list(rows)] = True

