"""Batched generation from token ids and mel features: jitted prefill and decode loop over a preallocated KV cache.

Legend: B batch, T prompt length, S cache slots, N audios in a batch, A audio slots per
prompt, P audio tokens per audio, M mel bins, F mel frames, D LLM width, V vocab.

Shapes are bucketed (B, T, S, N, A, F round up), so each jitted function compiles once per
bucket: the decode loop is a `lax.while_loop` whose carry holds the cache, so its
compilations do not grow with the number of generated tokens, and the number of steps per
call is a traced scalar (one call to the end, or short chunks for streaming and stop strings,
with the same executable). Prompts are left-padded, so every row writes the same cache slot;
RoPE positions come from the attention mask. On a mesh every function is jitted with explicit
in/out shardings while the mesh and logical axis rules are installed, so the models'
`constrain` hints apply.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import time
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llasm_jax import sharding
from llasm_jax.infer.sampling import SamplingParams, sample
from llasm_jax.layers import KVCache
from llasm_jax.layers.stack import unstack_layers
from llasm_jax.models.llama import LlamaForCausalLM
from llasm_jax.models.llasm import Llasm, check_audio_markers, splice
from llasm_jax.errors import UserError


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


@dataclasses.dataclass(frozen=True, eq=False)
class AudioFeatures:
  """One audio slot as cached frozen-Whisper outputs (`Llasm.encode_audio`, what `llasm-jax data
  encode` stores) instead of a log-mel: the engine runs only the adaptor on them.

  features:   float[S, E] the slot's valid feature frames (S = audio_token_len in "llasm" mode,
              ceil(F / 2) in "encoder" mode, 1..audio_token_len in "decoder" mode; E = LlasmConfig.feature_dim)
  mel_frames: F, the mel frames the slot had; its audio token count follows from them
  """

  features: np.ndarray
  mel_frames: int


def mel_frames(audio: "np.ndarray | AudioFeatures") -> int:
  """F of an audio slot given as log-mel float[M, F] or as `AudioFeatures`."""
  return audio.mel_frames if isinstance(audio, AudioFeatures) else audio.shape[1]


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


def bucket(n: int, minimum: int = 16) -> int:
  """Length bucket: powers of two up to 1024, then multiples of 1024."""
  if n <= 1024:
    return max(minimum, 1 << max(0, n - 1).bit_length())
  return -(-n // 1024) * 1024


# Callback after prefill and after each decode chunk: every real row's tokens so far
# (cut after EOS) -> rows that should stop now (stop strings), or None.
StepCallback = Callable[[list[list[int]]], Sequence[bool] | None]


class MeshFunctions:
  """Jitted pure functions of one model's parameters, on one device or sharded on `mesh`.

  Shared by `Engine` and `transcribe.Transcriber`: parameter placement, the shardings of host
  inputs, host <-> device transfers, and one `jax.jit` per (function, static arguments).
  `traces` counts how often each function was traced, i.e. compiled (the tests read it).
  """

  def __init__(self, mesh: jax.sharding.Mesh | None, rules: Sequence[tuple[str, object]] | None):
    if (mesh is None) != (rules is None):
      raise UserError("pass both mesh and rules (e.g. sharding.DEFAULT_RULES), or neither")
    self.mesh, self.rules = mesh, None if rules is None else tuple(tuple(r) for r in rules)
    self.traces: collections.Counter[str] = collections.Counter()
    self._jitted: dict[tuple, Callable] = {}
    # Rows are padded to a multiple of the devices the batch is split over.
    self.batch_multiple = 1
    if mesh is not None:
      names = sharding.logical_spec(("batch",), self.rules)[0]
      names = () if names is None else (names,) if isinstance(names, str) else names
      self.batch_multiple = int(np.prod([mesh.shape[n] for n in names]))

  def _rows(self, n: int) -> int:
    """Rows of a batch of `n` real rows: a power of two, a multiple of the batch devices."""
    return -(-bucket(max(n, 1), minimum=1) // self.batch_multiple) * self.batch_multiple

  def _place(self, model: nnx.Module) -> None:
    """Puts parameters that are not yet where they belong onto the device (or into their shards
    on the mesh), once. Host (numpy) parameters, as `convert.hf.load_tensors` leaves them, would
    otherwise be copied to the device at every call."""
    state = nnx.state(model)
    leaves = jax.tree.leaves(state)
    if self.mesh is None:
      if any(not isinstance(x, jax.Array) for x in leaves):
        nnx.update(model, jax.tree.map(jnp.asarray, state))
    elif any(not isinstance(x, jax.Array) or getattr(x.sharding, "mesh", None) != self.mesh for x in leaves):
      # `checkpoint.load_model(mesh=, rules=)` restores straight into the shards; this is the fallback.
      nnx.update(model, jax.device_put(state, sharding.state_shardings(state, self.mesh, self.rules)))

  # ---- shardings -------------------------------------------------------------------------

  def _sh(self, axes: Sequence[str | None], shape: Sequence[int] | None = None):
    """NamedSharding of an array with logical `axes`; dims of `shape` that do not divide stay whole."""
    spec = sharding.logical_spec(axes, self.rules)
    if shape is not None:
      spec = sharding.divisible_spec(shape, spec, self.mesh)
    return NamedSharding(self.mesh, spec)

  def _replicated(self):
    return NamedSharding(self.mesh, PartitionSpec())

  @staticmethod
  def _state_shardings(state):
    # The parameters stay where `checkpoint.load_model(mesh=, rules=)` restored them.
    return jax.tree.map(lambda x: x.sharding, state)

  def _put(self, x, sh):
    """Host array -> device array in sharding `sh` (every process holds the same full array)."""
    if self.mesh is None:
      return jnp.asarray(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

  def _get(self, x) -> np.ndarray:
    if self.mesh is not None and jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  @contextlib.contextmanager
  def _tracing_context(self):
    # Tracing happens on a bucket's first call: the models' `constrain` reads these then.
    if self.mesh is None:
      yield
    else:
      with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
        yield

  def _jit(self, name: str, fn: Callable, in_sh, out_sh, donate=(), **static) -> Callable:
    key = (name, *sorted(static.items()))
    if key not in self._jitted:
      fn = functools.partial(fn, **static)
      if self.mesh is None:
        self._jitted[key] = jax.jit(fn, donate_argnums=donate)
      else:
        self._jitted[key] = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=donate)
    return self._jitted[key]


class Engine(MeshFunctions):
  """Generation for a `LlamaForCausalLM` or a `Llasm`, on one device or on `mesh`.

  The model's parameters are split once (`nnx.split`); pure functions merge them inside jit.

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
    super().__init__(mesh, rules)
    self.model = model
    self.llm = model.llm if isinstance(model, Llasm) else model
    self.audio_cfg = model.cfg if isinstance(model, Llasm) else None
    cfg = self.llm.cfg
    self.eos_ids = tuple(int(e) for e in ([cfg.eos_token_id] if eos_ids is None else eos_ids))
    self.pad_id = int(pad_id if pad_id is not None else cfg.pad_token_id if cfg.pad_token_id is not None
                      else (self.eos_ids or (0,))[0])
    self._place(model)
    self.graphdef, self.state = nnx.split(model)
    self.llm_graphdef, self.llm_state = nnx.split(self.llm)
    self._audio_memo: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
    self.audio_memo_size = 64  # audios whose embeddings are remembered
    self.unstack_decode = jax.default_backend() == "cpu" if unstack_decode is None else bool(unstack_decode)
    self._split_decode()

  def update_params(self, model: LlamaForCausalLM | Llasm) -> None:
    """Takes the parameters of `model`, the same architecture with new values (a training run
    evaluating as it goes): same shapes and shardings, so nothing compiles again. Remembered
    audio embeddings are dropped, since the adaptor changed."""
    if nnx.graphdef(model) != self.graphdef:
      raise UserError("update_params needs a model of the same architecture as the engine's")
    self._place(model)
    self.model = model
    self.llm = model.llm if isinstance(model, Llasm) else model
    self.graphdef, self.state = nnx.split(model)
    self.llm_graphdef, self.llm_state = nnx.split(self.llm)
    self._split_decode()
    self._audio_memo.clear()

  def _split_decode(self) -> None:
    """`decode_graphdef`, `decode_state`: the LLM that prefill and decode run, its layers unstacked
    (their own arrays, copied once) with `unstack_decode`, else `llm_graphdef`, `llm_state`."""
    self.decode_graphdef, self.decode_state = self.llm_graphdef, self.llm_state
    if self.unstack_decode:
      with self._tracing_context():
        self.decode_graphdef, self.decode_state = nnx.split(
            unstack_layers(nnx.merge(self.llm_graphdef, self.llm_state)))

  def _cache_shardings(self, unstacked: bool = False) -> KVCache:
    """Shardings of a KV cache: k, v float[L, B, K, S, H], or (`unstacked`) tuples of L float[B, K, S, H]."""
    c = self.llm.cfg
    if unstacked:
      kv = (self._sh(("batch", "act_kv_heads", "length", "head_dim"),
                     (self.batch_multiple, c.num_key_value_heads, 1, c.kv_head_dim)),) * c.num_hidden_layers
    else:
      kv = self._sh(("layers", "batch", "act_kv_heads", "length", "head_dim"),
                    (c.num_hidden_layers, self.batch_multiple, c.num_key_value_heads, 1, c.kv_head_dim))
    return KVCache(k=kv, v=kv, mask=self._sh(("batch", "length")), index=self._replicated())

  def _decode_state_shardings(self) -> DecodeState:
    rows = self._sh(("batch",))
    cache = self._cache_shardings(unstacked=self.unstack_decode)
    return DecodeState(cache=cache, tokens=self._sh(("batch", "length")),
                       length=self._replicated(), last=rows, positions=rows, done=rows, rng=self._replicated())

  # ---- pure functions (traced) -----------------------------------------------------------

  def _encode_audio_fn(self, state, mel, mel_lengths):
    """mel float[N, M, F], mel_lengths int32[N] -> audio embeddings float[N, P, D], valid bool[N, P]."""
    self.traces["encode_audio"] += 1
    model = nnx.merge(self.graphdef, state)
    embeds, valid = model.embed_audio(mel[:, None], mel_lengths[:, None])
    return embeds[:, 0], valid[:, 0]

  def _adapt_fn(self, state, features, lengths):
    """Cached Whisper outputs float[N, S, E], lengths int32[N] -> float[N, P, D], valid bool[N, P]."""
    self.traces["adapt"] += 1
    model = nnx.merge(self.graphdef, state)
    embeds, valid = model.adapt(features[:, None], lengths[:, None])
    return embeds[:, 0], valid[:, 0]

  def _prefill_fn(self, llm_state, input_ids, attention_mask, active, audio, rng, temperature, top_k, top_p,
                  *, max_len: int, greedy: bool) -> DecodeState:
    """input_ids int32[B, T] left-padded, attention_mask bool[B, T], active bool[B] (False for
    batch padding), audio None or (embeds float[N, P, D], valid bool[N, P], slots int32[B, A]
    indexing N, -1 = empty) -> the decode state after the first generated token."""
    self.traces["prefill"] += 1
    llm = nnx.merge(self.decode_graphdef, llm_state)
    b, t = input_ids.shape
    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    embeds = llm.embed(input_ids)
    if audio is not None:
      audio_embeds, audio_valid, slots = audio
      filled = slots >= 0
      idx = jnp.maximum(slots, 0)
      embeds = splice(embeds, input_ids, audio_embeds[idx], audio_valid[idx] & filled[..., None],
                      self.audio_cfg.audio_patch_id)
    cache = llm.init_cache(b, max_len)
    if self.unstack_decode:
      cache = cache.unstack()
    hidden, cache = llm(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask, cache=cache,
                        return_hidden=True)
    # Left padding puts every row's last prompt token at T - 1: logits of that position only.
    rng, key = jax.random.split(rng)
    first = sample(llm.logits(hidden[:, -1:])[:, 0], key, temperature, top_k, top_p, greedy=greedy)
    done = ~active | self._is_eos(first)
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
                         positions=ds.positions + 1, done=ds.done | self._is_eos(token), rng=rng)

    ds = ds.replace(done=ds.done | stop)
    return jax.lax.while_loop(lambda ds: (ds.length < until) & ~jnp.all(ds.done), step, ds)

  def _is_eos(self, token):
    if not self.eos_ids:
      return jnp.zeros(token.shape, bool)
    return jnp.isin(token, jnp.asarray(self.eos_ids, jnp.int32))

  # ---- host side -------------------------------------------------------------------------

  def _check_audio(self, prompts: list[list[int]], mels: list[list[np.ndarray | AudioFeatures]]) -> None:
    """Raises if a mel (or cached features) has the wrong shape or the markers of a prompt
    disagree with its audios."""
    cfg = self.audio_cfg
    if cfg is None:
      raise UserError("this checkpoint is a text-only LLM; it cannot take audio (pass audios=None)")
    if len(mels) != len(prompts):
      raise UserError(f"{len(mels)} audio lists for {len(prompts)} prompts; pass one list (maybe empty) per prompt")
    m, f_max, e = cfg.audio.num_mel_bins, cfg.audio.max_mel_frames, cfg.feature_dim
    for b, (ids, row) in enumerate(zip(prompts, mels)):
      for j, mel in enumerate(row):
        f = mel_frames(mel)
        if isinstance(mel, AudioFeatures):
          s = cfg.feature_frames(f)
          if mel.features.ndim != 2 or mel.features.shape[1] != e or not cfg.feature_length_ok(len(mel.features), f):
            raise UserError(f"prompt {b} audio {j}: cached features of shape {mel.features.shape}, expected "
                             f"[{'1..' if cfg.mode == 'decoder' else ''}{s}, {e}] ({cfg.mode!r} mode, {f} mel frames, "
                             f"feature width {e}); were they encoded by this model's Whisper?")
        elif mel.ndim != 2 or mel.shape[0] != m:
          raise UserError(f"prompt {b} audio {j}: mel shape {mel.shape}, expected [{m}, frames] "
                           f"(this Whisper has num_mel_bins={m})")
        if f > f_max:
          raise UserError(f"prompt {b} audio {j}: {f} mel frames exceed 30 s ({f_max}); "
                           "split long audio into 30 s windows, one audio each")
        if cfg.padded_mel and f != f_max:
          raise UserError(f"prompt {b} audio {j}: {f} mel frames; 'llasm' mode reads features "
                           f"padded to 30 s ({f_max} frames), as Whisper's feature extractor makes them")
      counts = [cfg.audio_tokens(mel_frames(x)) for x in row]
      check_audio_markers(cfg, np.asarray([ids]), np.asarray([counts or [0]]))

  def _frames_bucket(self, mels: list[np.ndarray | AudioFeatures]) -> int:
    f_max = self.audio_cfg.audio.max_mel_frames
    if self.audio_cfg.padded_mel:
      return f_max
    return min(f_max, -(-max(mel_frames(x) for x in mels) // 256) * 256)

  def _audio_embeddings(self, mels: list[np.ndarray | AudioFeatures], timings: "Timings") -> list[np.ndarray]:
    """Each audio's embeddings float[P_i, D] (its valid tokens only). Whisper (or, for cached
    features, the adaptor) runs once per distinct audio: results are remembered (a chat sends
    its earlier audios again every turn)."""
    def key(x):
      if isinstance(x, AudioFeatures):
        return b"cached" + hashlib.sha1(np.ascontiguousarray(x.features).tobytes()).digest() + str(
            (x.features.shape, str(x.features.dtype), x.mel_frames)).encode()
      return hashlib.sha1(x.tobytes()).digest() + str(x.shape).encode()

    keys = [key(x) for x in mels]
    todo = list(dict.fromkeys(k for k in keys if k not in self._audio_memo))
    if todo:
      t0 = time.perf_counter()
      new = {k: mels[keys.index(k)] for k in todo}
      for cached in (False, True):
        group = [k for k in todo if isinstance(new[k], AudioFeatures) == cached]
        if not group:
          continue
        embeds, valid = self._run_audio([new[k] for k in group], cached)
        for i, k in enumerate(group):
          self._audio_memo[k] = embeds[i, :int(valid[i].sum())]
      timings.audio_s = time.perf_counter() - t0
    out = []
    for k in keys:
      self._audio_memo.move_to_end(k)
      out.append(self._audio_memo[k])
    while len(self._audio_memo) > self.audio_memo_size:
      self._audio_memo.popitem(last=False)
    return out

  def _run_audio(self, new: list, cached: bool) -> tuple[np.ndarray, np.ndarray]:
    """Packed audios through Whisper + adaptor (log-mels) or the adaptor alone (cached features)."""
    rows = self._rows(len(new))
    if cached:
      # S of the batch: the decoder queries or transcript tokens, or the encoder frames of the frame bucket.
      s = self.audio_cfg.feature_frames(self._frames_bucket(new))
      feats = np.zeros((rows, s, new[0].features.shape[1]), new[0].features.dtype)
      lengths = np.zeros((rows,), np.int32)
      for i, x in enumerate(new):
        feats[i, :len(x.features)] = x.features
        lengths[i] = len(x.features)
      return tuple(self._get(a) for a in self.adapt_features(feats, lengths))
    m = self.audio_cfg.audio.num_mel_bins
    mel = np.zeros((rows, m, self._frames_bucket(new)), np.float32)
    lengths = np.zeros((rows,), np.int32)
    for i, x in enumerate(new):
      mel[i, :, :x.shape[1]] = x
      lengths[i] = x.shape[1]
    return tuple(self._get(a) for a in self.encode_audio(mel, lengths))

  def _pack_audio(self, mels: list[list[np.ndarray | AudioFeatures]], rows: int, timings: "Timings"):
    """Audio embeddings of every prompt, packed: float[N, P, D], valid bool[N, P] and slots
    int32[B, A] (row b's a-th audio is number slots[b, a] of N; -1 = none)."""
    flat = [x for row in mels for x in row]
    per_audio = self._audio_embeddings(flat, timings)
    # P of the batch's frame bucket, so the prefill compiles once per bucket.
    p = self.audio_cfg.audio_tokens(self._frames_bucket(flat))
    dtype = np.result_type(*[e.dtype for e in per_audio])
    embeds = np.zeros((self._rows(len(flat)), p, per_audio[0].shape[-1]), dtype)
    valid = np.zeros(embeds.shape[:2], bool)
    for i, e in enumerate(per_audio):
      embeds[i, :len(e)] = e
      valid[i, :len(e)] = True
    slots = np.full((rows, bucket(max(len(r) for r in mels), minimum=1)), -1, np.int32)
    i = 0
    for b, row in enumerate(mels):
      slots[b, :len(row)] = np.arange(i, i + len(row))
      i += len(row)
    return embeds, valid, slots

  def encode_audio(self, mel: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Whisper + adaptor over packed audios: float32[N, M, F], int32[N] -> float[N, P, D], bool[N, P]."""
    return self._audio_call("encode_audio", self._encode_audio_fn, mel, lengths)

  def adapt_features(self, features: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """The adaptor over packed cached Whisper outputs: float[N, S, E], int32[N] -> float[N, P, D], bool[N, P]."""
    return self._audio_call("adapt", self._adapt_fn, features, lengths)

  def _audio_call(self, name: str, fn, x: np.ndarray, lengths: np.ndarray):
    in_sh = out_sh = (None, None, None)
    if self.mesh is not None:
      in_sh = (self._state_shardings(self.state), self._sh(("batch", None, None)), self._sh(("batch",)))
      out_sh = (self._sh(("batch", None, "act_embed")), self._sh(("batch", None)))
    fn = self._jit(name, fn, in_sh, out_sh)
    with self._tracing_context():
      return fn(self.state, self._put(x, in_sh[1]), self._put(lengths, in_sh[2]))

  def _pad_prompts(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded input_ids int32[B, T], attention mask bool[B, T] and active rows bool[B], with B
    and T bucketed and B a multiple of the devices the batch is split over."""
    real = len(prompts)
    rows = self._rows(real)
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
    if self.mesh is None:
      sh = dict(table=None, rows=None, scalar=None, audio=(None, None, None))
      prefill_in = decode_in = ds_sh = None
    else:
      sh = dict(table=self._sh(("batch", "length")), rows=self._sh(("batch",)), scalar=self._replicated())
      llm_sh = self._state_shardings(self.decode_state)
      ds_sh = self._decode_state_shardings()
      sh["audio"] = (self._sh(("batch", None, "act_embed")), self._sh(("batch", None)), self._sh(("batch", None)))
      audio_sh = sh["audio"] if with_audio else None
      sampling_sh = (sh["scalar"],) * 3
      prefill_in = (llm_sh, sh["table"], sh["table"], sh["rows"], audio_sh, sh["scalar"], *sampling_sh)
      decode_in = (llm_sh, ds_sh, sh["scalar"], sh["rows"], *sampling_sh)
    # With and without audio the inputs differ in structure, hence in shardings: two functions.
    prefill = self._jit("prefill_audio" if with_audio else "prefill", self._prefill_fn, prefill_in, ds_sh,
                        max_len=max_len, greedy=greedy)
    decode = self._jit("decode", self._decode_fn, decode_in, ds_sh, donate=(1,), greedy=greedy)
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
      mels = [[x if isinstance(x, AudioFeatures) else np.asarray(x, np.float32) for x in row] for row in mels]
      self._check_audio(prompts, mels)
      audio = self._pack_audio(mels, rows, timings)
    elif self.audio_cfg is not None:
      for p in prompts:  # markers without audio are an input error too
        check_audio_markers(self.audio_cfg, np.asarray([p]), np.zeros((1, 1), np.int32))

    prefill, decode, sh = self._functions(max_len, sampling.greedy, audio is not None)
    params = sampling.arrays()
    rng = jax.random.key(sampling.seed)

    with self._tracing_context():
      t0 = time.perf_counter()
      if audio is not None:
        audio = tuple(self._put(a, s) for a, s in zip(audio, sh["audio"]))
      ds = prefill(self.decode_state, self._put(input_ids, sh["table"]), self._put(mask, sh["table"]),
                   self._put(active, sh["rows"]), audio, rng, *params)
      length, done, tokens = self._get(ds.length), self._get(ds.done), self._get(ds.tokens)
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
        ds = decode(self.decode_state, ds, self._put(np.int32(until), sh["scalar"]), self._put(stopped, sh["rows"]), *params)
        length, done, tokens = self._get(ds.length), self._get(ds.done), self._get(ds.tokens)
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
