"""A deterministic synthetic grain dataset in the training batch contract, for tests and benchmarks.

Each example is one spoken "question" (random mel) between random text, and a random answer
with loss on it, shaped exactly like the real pipeline's output (see llasm_jax/train/step.py).
With `teacher`, the distillation teacher's sequence too: the audio span replaced by random
"transcript" tokens.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from llasm_jax.data.contract import PipelineConfig, batch_spec, target_positions, teacher_target_positions
from llasm_jax.models.llasm import LlasmConfig
from llasm_jax.tokens import IGNORE


def example_spec(cfg: LlasmConfig, data: ml_collections.ConfigDict,
                 teacher: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shape and dtype of each key of one example: a row of the batch contract (`contract.batch_spec`)."""
  pcfg = PipelineConfig.from_model(cfg, seq_len=data.seq_len, max_audios=data.max_audios, mel_frames=data.mel_frames,
                                   teacher=teacher)
  return {k: (shape[1:], dtype) for k, (shape, dtype) in batch_spec(pcfg, 1).items()}


def make_example(cfg: LlasmConfig, data: ml_collections.ConfigDict, seed: int, index: int,
                 teacher: bool = False) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, index])
  spec = example_spec(cfg, data, teacher)
  geometry = cfg.geometry(data.mel_frames)
  frames, p = geometry.frames, geometry.window_tokens
  (t,), _ = spec["input_ids"]
  low = min(cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id)
  prompt = rng.integers(3, low, rng.integers(2, 8)).tolist()
  answer_len = int(rng.integers(4, max(5, t - len(prompt) - p - 4)))
  answer = rng.integers(3, low, answer_len).tolist() + [cfg.llm.eos_token_id]
  ids = [cfg.llm.bos_token_id] + prompt + [cfg.audio_start_id] + [cfg.audio_patch_id] * p + [cfg.audio_end_id]
  n_prompt = len(ids)
  ids = (ids + answer)[:t]
  n = len(ids)
  input_ids = np.zeros(*spec["input_ids"])
  input_ids[:n] = ids
  labels = np.full(spec["labels"][0], IGNORE, spec["labels"][1])
  labels[n_prompt:n] = input_ids[n_prompt:n]
  mel = np.zeros(*spec["mel"])
  mel[0] = rng.uniform(-1.0, 1.0, mel.shape[1:])
  mel_lengths = np.zeros(*spec["mel_lengths"])
  mel_lengths[0] = frames
  out = dict(input_ids=input_ids, labels=labels, attention_mask=(np.arange(t) < n).astype(np.int32),
             positions=np.arange(t, dtype=np.int32), target_positions=target_positions(labels[None], t)[0],
             mel=mel, mel_lengths=mel_lengths)
  if teacher:  # drawn last, so the student's example is the same with or without a teacher
    spoken = rng.integers(3, low, rng.integers(2, 8)).tolist()
    t_ids = ([cfg.llm.bos_token_id] + prompt + spoken + answer)[:t]
    t_prompt = 1 + len(prompt) + len(spoken)
    teacher_ids = np.zeros(*spec["teacher_input_ids"])
    teacher_ids[:len(t_ids)] = t_ids
    t_labels = np.full(t, IGNORE, np.int32)
    t_labels[t_prompt:len(t_ids)] = teacher_ids[t_prompt:len(t_ids)]
    slots = teacher_target_positions(t_labels[None], out["target_positions"][None])[0]
    out.update(teacher_input_ids=teacher_ids, teacher_attention_mask=(np.arange(t) < len(t_ids)).astype(np.int32),
               teacher_positions=np.arange(t, dtype=np.int32), teacher_target_positions=slots)
  assert all(out[k].shape == shape and out[k].dtype == dtype for k, (shape, dtype) in spec.items())
  return out


def synthetic_dataset(cfg: LlasmConfig, data: ml_collections.ConfigDict, *, seed: int, host_batch: int,
                      process_index: int, process_count: int, teacher: bool = False) -> grain.IterDataset:
  """Host batches of `host_batch`; the union over processes of batch k is global batch k."""
  ds = grain.MapDataset.range(data.num_examples).shuffle(seed=seed).repeat()
  ds = ds[process_index::process_count]
  ds = ds.map(lambda i: make_example(cfg, data, seed, int(i), teacher))
  return ds.batch(host_batch, drop_remainder=True).to_iter_dataset()
