"""`llasm-jax forward`: a random-weight LLaSM forward on synthetic speech, sharded on the config's mesh, with timings."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from flax import nnx

from llasm_jax import sharding
from llasm_jax.config import llasm_config
from llasm_jax.data import features
from llasm_jax.data.audio import synth_speech
from llasm_jax.models.llasm import Llasm, LlasmConfig, check_audio_markers
from llasm_jax.errors import UserError


def _log(*args):
  # Every process runs the same program; one copy of the report is enough.
  if jax.process_index() == 0:
    print(*args, flush=True)


def forward_inputs(cfg: LlasmConfig, batch: int, seconds: float, text_tokens: int, seed: int = 0):
  """input_ids int32[B, T], mel float32[B, 1, M, F], mel_lengths int32[B, 1]: one audio per sample
  between random text, marked `<au_start>` + P x `<au_patch>` + `<au_end>`."""
  if not cfg.padded_mel and seconds * 100 > cfg.audio.max_mel_frames:
    raise UserError(f"--seconds {seconds}: the {cfg.mode}-mode forward takes one window of at most "
                     f"{cfg.audio.max_mel_frames / 100:g} s")
  mel = np.stack([features.log_mel(synth_speech(seconds, seed + b), cfg.audio.num_mel_bins, cfg.mode)
                  for b in range(batch)])
  frames = mel.shape[-1]
  p = cfg.audio_tokens(frames)
  rng = np.random.default_rng(seed)
  # Text ids below the audio markers, so no random token is mistaken for one.
  low = min(cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id)
  text = rng.integers(3, low, size=(batch, 2 * text_tokens))
  audio = [cfg.audio_start_id] + [cfg.audio_patch_id] * p + [cfg.audio_end_id]
  input_ids = np.concatenate(
      [text[:, :text_tokens], np.tile(audio, (batch, 1)), text[:, text_tokens:]], axis=1).astype(np.int32)
  check_audio_markers(cfg, input_ids, np.full((batch, 1), p))
  return input_ids, mel[:, None], np.full((batch, 1), frames, np.int32)


def run_forward(run_cfg, *, config_name: str, batch: int, seconds: float, text_tokens: int, repeats: int,
             mesh_shape=None) -> None:
  """Random-weight forward of the config's model on synthetic speech: shapes and timings."""
  cfg = llasm_config(run_cfg.model)
  rules = tuple(tuple(r) for r in run_cfg.logical_axis_rules)
  mesh = sharding.make_mesh(mesh_shape or run_cfg.mesh.shape)
  _log(f"config {config_name}: mode {cfg.mode!r}, LLM {cfg.llm.num_hidden_layers}x{cfg.llm.hidden_size}, "
       f"Whisper d={cfg.audio.d_model}, compute {cfg.llm.dtype}, params {cfg.llm.param_dtype}")
  _log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} processes), "
       f"mesh {dict(mesh.shape)}")

  input_ids, mel, mel_lengths = forward_inputs(cfg, batch, seconds, text_tokens)
  _log(f"audio: {batch} x {seconds:g} s -> mel float32{list(mel.shape)}, "
       f"{cfg.audio_tokens(mel.shape[-1])} audio tokens each; input_ids int32{list(input_ids.shape)}")

  # Random weights, created directly in their shards so a 7B model never sits on one device.
  def make():
    return Llasm(cfg, rngs=nnx.Rngs(0))

  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  state_sharding = sharding.state_shardings(abstract, mesh, rules)
  n_params = sum(x.size for x in jax.tree.leaves(abstract))
  t0 = time.perf_counter()
  state = jax.jit(lambda: nnx.state(make()), out_shardings=state_sharding)()
  jax.block_until_ready(state)
  _log(f"model: {n_params / 1e6:.2f} M parameters, random init {time.perf_counter() - t0:.1f} s")

  def forward(state, input_ids, mel, mel_lengths):
    model = nnx.merge(graphdef, state)
    logits, _ = model(input_ids, mel, mel_lengths)
    return logits

  arrays = (
      sharding.shard_batch(input_ids, mesh, rules, ("batch", "length")),
      sharding.shard_batch(mel, mesh, rules, ("batch", None, None, None)),
      sharding.shard_batch(mel_lengths, mesh, rules, ("batch", None)),
  )
  # The rules and mesh must be active while tracing: that is when `constrain` reads them.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(state, *arrays).compile()
    compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits = jax.block_until_ready(compiled(state, *arrays))
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, *arrays))
    times.append(time.perf_counter() - t0)

  _log(f"logits: {logits.dtype}{list(logits.shape)}, finite: {bool(jax.numpy.isfinite(logits).all())}")
  _log(f"compile: {compile_s:.2f} s; first call {first_s * 1e3:.1f} ms")
  if times:
    _log(f"forward: median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms "
         f"over {len(times)} calls ({batch / min(times):.1f} samples/s)")


