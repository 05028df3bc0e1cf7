"""config.data.packing in training: packed rows give the loss and gradients of the same samples
unpacked, attention stays inside each sample (its positions restarting, its audio its own), and a
packed run resumes exactly."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llasm_jax import tokens
from llasm_jax import checkpoint
from llasm_jax.convert.convert import convert
from llasm_jax.data import builders, contract, packing, pipeline
from tests.conftest import assert_close
from tests.infer.conftest import save_hf_pair
from tests.train.test_train import tiny_config

CLIPS = ["speech_en/hello_world.wav", "speech_en/weather.wav", "speech_en/weather.flac", "speech_en/counting.ogg"]
SEQ, SLOTS = 640, 8  # packed rows; the 3-4.5 s clips take two 3 s windows (slots) each


@pytest.fixture(scope="module")
def setup(tmp_path_factory, assets):
  """A converted tiny encoder-mode LLaSM and an instructions dataset of eight conversations whose
  answers grow from 3 to 66 words, every third one with a second spoken turn."""
  root = tmp_path_factory.mktemp("packing")
  convs = []
  for i in range(8):
    turns = [{"from": "human", "value": "what is said?", "audio": CLIPS[i % 4]},
             {"from": "gpt", "value": " ".join(["the sunny weather"] * (1 + 3 * i))}]
    if i % 3 == 2:
      turns += [{"from": "human", "value": "and here?", "audio": CLIPS[(i + 1) % 4]},
                {"from": "gpt", "value": "hello"}]
    convs.append({"id": f"c{i}", "conversations": turns})
  (root / "convs.jsonl").write_text("\n".join(json.dumps(c) for c in convs))
  data = builders.build("instructions", builders.instruction_rows(str(root / "convs.jsonl"), assets),
                        str(root / "convs"), quiet=True).path
  save_hf_pair(root)
  ckpt = str(root / "llasm")
  convert(str(root / "hf_llm"), str(root / "hf_whisper"), out=ckpt, mode="encoder", progress=False)
  cfg = checkpoint.config_from_dict("llasm", checkpoint.read_meta(ckpt)["config"])
  return dict(root=root, data=data, ckpt=ckpt, cfg=cfg)


def same_samples(setup, shared_prefix: bool):
  """(plain, packed): one batch of all eight samples, a row each, and the same samples packed into
  fewer rows, then padded with empty rows to the plain batch's shape (an empty row has no targets:
  the loss and gradients are the packed rows' alone), so that a step of both compiles once."""
  # Without a shared prefix the system prompt is left out, so that several samples fit a row.
  pcfg = pipeline.PipelineConfig.from_model(setup["cfg"], seq_len=SEQ, max_audios=SLOTS, mel_frames=300,
                                            system=None if shared_prefix else "", shared_prefix=shared_prefix,
                                            packing=True, pack_window=8)
  source = pipeline.Source(setup["data"])
  kw = dict(seed=0, shard_index=0, shard_count=1)
  window = pipeline.batched_dataset(source, pcfg, setup["ckpt"], batch_size=1, **kw)[0]
  packed = pipeline.Collate(pcfg, 0)(packing.window_rows(window))
  plain = pipeline.batched_dataset(source, dataclasses.replace(pcfg, packing=False), setup["ckpt"], batch_size=8,
                                   **kw)[0]
  rows = len(packed["input_ids"])
  assert rows < 8 and packed["segment_ids"].max() > 1  # rows of several samples
  assert packed["attention_mask"].sum() == plain["attention_mask"].sum()
  contract.check_batch(packed, setup["cfg"])
  fill = {"labels": tokens.IGNORE, "target_positions": -1}
  empty = {k: np.full((8 - rows, *v.shape[1:]), fill.get(k, 0), v.dtype) for k, v in packed.items()
           if k != "prefix_ids"}
  return plain, {k: np.concatenate([v, empty[k]]) if k in empty else v for k, v in packed.items()}


def step_deltas(setup, batches):
  """Loss, target count and -gradient (the update of plain SGD with rate 1) of stage 2's step, per batch."""
  from llasm_jax.train.optim import FROZEN, TRAIN, param_labels
  from llasm_jax.train.step import TrainState, make_train_step

  model, _ = checkpoint.load_model(setup["ckpt"])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  labels = param_labels(params, ("adaptor/.*", "llm/.*"))
  tx = optax.apply_if_finite(optax.multi_transform({TRAIN: optax.sgd(1.0), FROZEN: optax.set_to_zero()}, labels), 1)
  step = jax.jit(make_train_step(graphdef, tx, labels, grad_accum=1))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                     rng=jnp.zeros((2,), jnp.uint32))
  out = []
  for batch in batches:
    new, metrics = step(state, batch)
    deltas = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), nnx.to_pure_dict(params),
                          nnx.to_pure_dict(new.params))
    out.append((float(metrics["loss"]), float(metrics["target_tokens"]), deltas))
  return out


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["plain", "shared_prefix"])
def test_packed_rows_give_the_loss_and_gradients_of_the_samples(setup, shared_prefix):
  plain, packed = same_samples(setup, shared_prefix)
  # The same keys, for one compile: each plain row one segment, which masks as no segment_ids does
  # (test_attention_stays_inside_each_sample compares against rows without them).
  plain = {**plain, "segment_ids": plain["attention_mask"]}
  (loss, count, grads), (packed_loss, packed_count, packed_grads) = step_deltas(setup, (plain, packed))
  assert count == packed_count > 100
  np.testing.assert_allclose(packed_loss, loss, rtol=1e-5)
  flat, packed_flat = ({jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(g)}
                       for g in (grads, packed_grads))
  moved = [p for p, g in flat.items() if np.abs(g).max() > 0]
  assert any(p.startswith("['adaptor']") for p in moved) and any(p.startswith("['llm']") for p in moved)
  for path, g in flat.items():
    assert_close(packed_flat[path], g, atol=1e-5 * float(np.abs(g).max()))


def test_attention_stays_inside_each_sample(setup):
  """Each packed sample's logits are those it has alone in a row (positions restart, its audio is
  its own), and changing one sample's text and audio leaves every other sample's logits unchanged."""
  plain, packed = same_samples(setup, shared_prefix=False)
  model, _ = checkpoint.load_model(setup["ckpt"])
  keys = ("input_ids", "mel", "mel_lengths", "attention_mask", "positions", "segment_ids")
  forward = nnx.jit(lambda m, b: m(**b)[0])
  logits = np.asarray(forward(model, {k: packed[k] for k in keys}))
  alone = np.asarray(forward(model, {k: plain[k] for k in keys if k != "segment_ids"}))
  cfg = setup["cfg"]
  where = []  # (row, start, end) of each packed sample
  for r, seg in enumerate(packed["segment_ids"]):
    where += [(r, *np.flatnonzero(seg == k)[[0, -1]] + [0, 1]) for k in range(1, seg.max() + 1)]
  for r, a, z in where:
    ids = packed["input_ids"][r, a:z]
    i = next(i for i in range(len(plain["input_ids"])) if np.array_equal(plain["input_ids"][i, :z - a], ids)
             and plain["attention_mask"][i].sum() == z - a)
    assert_close(logits[r, a:z], alone[i, :z - a], atol=2e-5)
  # The second sample of a row of several: new text tokens and new audio in its slots.
  r, a, z = next(w for w in where if packed["segment_ids"][w[0], w[1]] == 2)
  changed = {k: np.array(packed[k]) for k in keys}
  text = np.flatnonzero(~np.isin(changed["input_ids"][r, a:z], [cfg.audio_patch_id, cfg.audio_start_id,
                                                                    cfg.audio_end_id])) + a
  changed["input_ids"][r, text[1:]] = (changed["input_ids"][r, text[1:]] + 7) % cfg.audio_patch_id
  first = int(np.sum(changed["input_ids"][r, :a] == cfg.audio_start_id))
  own = int(np.sum(changed["input_ids"][r, a:z] == cfg.audio_start_id))
  slots = changed["mel"][r, first:first + own]
  changed["mel"][r, first:first + own] = np.random.default_rng(0).standard_normal(slots.shape)
  after = np.asarray(forward(model, changed))
  mine = np.zeros(logits.shape[:2], bool)
  mine[r, a:z] = True
  others = (packed["attention_mask"] == 1) & ~mine  # (padding positions read every real key before them)
  np.testing.assert_array_equal(after[others], logits[others])  # exactly: no attention across samples
  assert np.abs(after[r, a + 1:z] - logits[r, a + 1:z]).max() > 1e-3


def test_packed_training_resumes_exactly(setup):
  from llasm_jax.train.trainer import train

  def config(**train):
    config = tiny_config(stage=2, steps=4, **train)
    config.train.init_from = setup["ckpt"]
    config.train.batch_size = 2
    config.optim.lr = 1e-3
    config.data.update(dict(source="tfds", dir=setup["data"], seq_len=SEQ, max_audios=SLOTS, mel_frames=300,
                            workers=-1, system="", packing=True, pack_window=3))
    config.train.compilation_cache = str(setup["root"] / "compilation_cache")  # the three runs compile once
    return config

  root = setup["root"]
  straight = train(config(), str(root / "straight"))
  first = train(config(debug_sigterm_at_step=2), str(root / "resumed"))  # preempted: saved at step 2
  resumed = train(config(), str(root / "resumed"))
  assert first["stop_reason"].startswith("preempted") and first["step"] == 2
  assert straight["stop_reason"] == resumed["stop_reason"] == "finished"
  losses = [h["loss"] for h in straight["history"]]
  assert all(np.isfinite(losses)) and len(set(losses)) == 4
  assert [h["loss"] for h in first["history"] + resumed["history"]] == losses
  ref, got = (checkpoint.load_params_numpy(os.path.join(root / name, "model")) for name in ("straight", "resumed"))
  for path in ref:
    np.testing.assert_array_equal(got[path], ref[path], err_msg=path)
