"""The distillation loss (config.train.loss "kd" / "mix"): the step against a KL written out by hand
in numpy on a tiny model, the teacher's text sequences from the pipeline, the stage-2 refusal, and
a short run through `trainer.train`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llasm_jax import tokens
from llasm_jax.data import builders, contract, pipeline
from llasm_jax.errors import UserError
from llasm_jax.models.llasm import Llasm
from llasm_jax.train import trainer
from llasm_jax.train.setup import prepare
from llasm_jax.train.step import TrainState, make_train_step
from llasm_jax.train.synthetic import synthetic_dataset
from tests.data.conftest import tiny_model, train_llama_tokenizer
from tests.train.test_train import tiny_config

from llasm_jax.tokens import IGNORE


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def hand_losses(model, batch, temperature):
  """(CE mean, KL mean) from full forwards at every position, in float64: the student is the whole
  Llasm on the audio, the teacher the LLM alone on the teacher's ids; the teacher's answer is the
  tail of its sequence (nothing is cut in these batches), paired in order with the student's; rows
  without a teacher (all padding) count for the CE only."""
  logits, _ = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["mel"]), jnp.asarray(batch["mel_lengths"]),
                    attention_mask=jnp.asarray(batch["attention_mask"]), positions=jnp.asarray(batch["positions"]))
  t_logits, _ = model.llm(jnp.asarray(batch["teacher_input_ids"]),
                          attention_mask=jnp.asarray(batch["teacher_attention_mask"]),
                          positions=jnp.asarray(batch["teacher_positions"]))
  logits, t_logits = np.asarray(logits, np.float64), np.asarray(t_logits, np.float64)
  ce, kl, count, kd_count = 0.0, 0.0, 0, 0
  for row in range(len(logits)):
    labels = batch["labels"][row]
    s_pos = np.flatnonzero(labels[1:] != IGNORE)  # positions predicting an answer token
    log_q = _log_softmax(logits[row, s_pos])
    ce -= log_q[np.arange(len(s_pos)), labels[s_pos + 1]].sum()
    count += len(s_pos)
    n_t = int(batch["teacher_attention_mask"][row].sum())
    if n_t == 0:
      continue
    t_pos = np.arange(n_t - 1 - len(s_pos), n_t - 1)
    # The same answer tokens in both sequences.
    np.testing.assert_array_equal(batch["teacher_input_ids"][row, t_pos + 1], labels[s_pos + 1])
    log_p = _log_softmax(t_logits[row, t_pos] / temperature)
    log_q = _log_softmax(logits[row, s_pos] / temperature)
    kl += (np.exp(log_p) * (log_p - log_q)).sum() * temperature ** 2
    kd_count += len(s_pos)
  return ce / count, kl / kd_count


def step_once(loss, kd_weight=0.5, kd_temperature=1.0, grad_accum=1, batch_size=4, untaught_rows=()):
  """One train step of the tiny stage-1 model on a synthetic batch with a teacher (none for
  `untaught_rows`, as the pipeline leaves rows whose audio has no known text): (metrics, new
  params, the model before the step, the host batch)."""
  config = tiny_config(stage=1, loss=loss, kd_weight=kd_weight, kd_temperature=kd_temperature)
  setup = prepare(config)
  host = next(iter(synthetic_dataset(setup.cfg, config.data, seed=0, host_batch=batch_size, process_index=0,
                                     process_count=1, teacher=True)))
  for row in untaught_rows:
    for k in ("teacher_input_ids", "teacher_attention_mask"):
      host[k][row] = 0
    host["teacher_target_positions"][row] = -1
  _, params, rest = nnx.split(Llasm(setup.cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.labels, grad_accum=grad_accum, loss=loss,
                                 kd_weight=kd_weight, kd_temperature=kd_temperature))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=setup.tx.init(params),
                     rng=jnp.zeros((2,), jnp.uint32))
  new, metrics = step(state, {k: jnp.asarray(v) for k, v in host.items()})
  return ({k: float(v) for k, v in metrics.items()}, jax.tree.leaves(new.params),
          nnx.merge(setup.graphdef, params, rest), host)


def test_kd_loss_equals_a_hand_written_kl():
  metrics, _, model, host = step_once("kd")
  ce, kl = hand_losses(model, host, 1.0)
  assert kl > 1e-6  # teacher (text) and student (audio) disagree: the comparison is not vacuous
  np.testing.assert_allclose([metrics["loss"], metrics["kd"]], [kl, kl], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
  assert metrics["kd_tokens"] == metrics["target_tokens"] == sum((host["labels"][:, 1:] != IGNORE).sum(1))


def test_mix_is_the_weighted_sum_and_accumulates():
  """(1 - w) CE mean + w KL mean, each over its own tokens (row 0 has no teacher, so they differ),
  the same with two microbatches (row 0 in the first only)."""
  w, temp = 0.3, 2.0
  metrics, params, model, host = step_once("mix", kd_weight=w, kd_temperature=temp, untaught_rows=(0,))
  ce, kl = hand_losses(model, host, temp)
  np.testing.assert_allclose([metrics["ce"], metrics["kd"]], [ce, kl], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], (1 - w) * ce + w * kl, rtol=1e-5)
  assert 0 < metrics["kd_tokens"] < metrics["target_tokens"] and metrics["update_applied"]
  assert all(np.isfinite(np.asarray(p)).all() for p in params)  # the padded teacher row leaks no NaN
  accum, accum_params, _, _ = step_once("mix", kd_weight=w, kd_temperature=temp, grad_accum=2, untaught_rows=(0,))
  np.testing.assert_allclose(accum["loss"], metrics["loss"], rtol=1e-5)
  for a, b in zip(accum_params, params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_kd_needs_a_frozen_llm_and_a_known_loss():
  with pytest.raises(UserError, match=r"loss='kd' distils from the frozen LLM, but config.train.trainable trains"):
    prepare(tiny_config(stage=2, loss="kd"))
  with pytest.raises(UserError, match="use loss 'ce' there"):
    prepare(tiny_config(stage=2, loss="mix"))
  with pytest.raises(UserError, match=r"config.train.loss 'kl': expected one of ce, kd, mix"):
    prepare(tiny_config(stage=1, loss="kl"))
  with pytest.raises(UserError, match="kd_weight 1.5"):
    prepare(tiny_config(stage=1, loss="mix", kd_weight=1.5))


def test_compile_only_knows_the_teacher_keys():
  """The ahead-of-time compile (no data read) traces the step with the teacher's sequences."""
  out = trainer.compile_only(tiny_config(stage=1, loss="mix"))
  assert out["argument_size_gib"] > 0


# ---- the teacher's sequences from the pipeline ------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("kd_tok")
  train_llama_tokenizer(folder).save_pretrained(str(folder / "hf"))
  return str(folder / "hf")


class Records:
  """Records in the builders' format, given as a list."""

  def __init__(self, kind, records):
    self.kind, self.records = kind, records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i % len(self.records)]


def _clip(seconds=1.0, f=220.0):
  t = np.arange(int(seconds * 16000)) / 16000
  return (3000 * np.sin(2 * np.pi * f * t)).astype(np.int16)


def _batch(source, tokenizer_dir, b, **kw):
  cfg = pipeline.PipelineConfig.from_model(tiny_model(), teacher=True, system="", **kw)
  with pipeline.make_iterator(source, cfg, tokenizer_dir, batch_size=b, shard_index=0, shard_count=1) as it:
    return next(it)


def _teacher_prompt(tok, batch, row):
  """The teacher's text before its first answer slot's token."""
  first = batch["teacher_target_positions"][row, 0]
  return tok.decode(batch["teacher_input_ids"][row, :first + 1])


def test_teacher_sequences_read_the_transcripts(tokenizer_dir):
  tok = tokens.load_tokenizer(tokenizer_dir)
  model = tiny_model()
  markers = [model.audio_patch_id, model.audio_start_id, model.audio_end_id]
  asr = pipeline.SyntheticSource("asr", 4, seed=1)
  inst = pipeline.SyntheticSource("instructions", 4, seed=2, max_turns=2)
  for source in (asr, inst):
    batch = _batch(source, tokenizer_dir, 4, seq_len=256, buckets=(128, 256), max_audios=2)
    contract.check_batch(batch, model)
    assert batch["teacher_input_ids"].shape[1] in (128, 256)
    assert batch["teacher_target_positions"].shape == batch["target_positions"].shape
    assert not np.isin(batch["teacher_input_ids"], markers).any()  # text only
    for row in range(4):
      s, t = batch["target_positions"][row], batch["teacher_target_positions"][row]
      assert np.all((s >= 0) == (t >= 0)) and np.sum(s >= 0) > 0  # nothing cut: every answer slot paired
      np.testing.assert_array_equal(batch["input_ids"][row, s[s >= 0] + 1], batch["teacher_input_ids"][row, t[t >= 0] + 1])
      np.testing.assert_array_equal(batch["teacher_positions"][row], np.arange(batch["teacher_input_ids"].shape[1]))
    # Each row's teacher text holds the texts its audios speak, the first one before the first answer
    # (rows are shuffled: some record's).
    spoken = [[source[i]["text"].decode()] if source.kind == "asr" else [t.decode() for t in source[i]["transcripts"]]
              for i in range(4)]
    for row in range(4):
      prompt = _teacher_prompt(tok, batch, row)
      text = tok.decode(batch["teacher_input_ids"][row, batch["teacher_attention_mask"][row] == 1])
      assert any(texts[0] in prompt and all(t in text for t in texts) for texts in spoken), text


def test_teacher_cuts_and_missing_transcripts(tokenizer_dir):
  """Slots are kept where both sequences hold the answer token; a record whose audio has no known
  text has no teacher (all -1); a dataset built before transcripts were stored is refused."""
  long_text = " ".join(["hello world the weather"] * 4)  # the teacher: 104 tokens, its answer from 93 on
  records = [
      {"id": b"known", "roles": np.int32([0, 1]), "values": [b"<audio>", b"sunny in paris"],
       "transcripts": [long_text.encode()], "audio": _clip(), "audio_lengths": np.int32([16000]), "language": b"en"},
      {"id": b"unknown", "roles": np.int32([0, 1]), "values": [b"compare <audio>", b"one two three"],
       "transcripts": [b""], "audio": _clip(), "audio_lengths": np.int32([16000]), "language": b"en"},
  ]
  batch = _batch(Records("instructions", records), tokenizer_dir, 2, seq_len=96)
  by_id = {}
  for row in range(2):
    n = int(batch["teacher_attention_mask"][row].sum())
    by_id["unknown" if n == 0 else "known"] = row
  s, t = batch["target_positions"][by_id["known"]], batch["teacher_target_positions"][by_id["known"]]
  # The long transcript pushes the teacher's answer past seq_len: fewer teacher slots, paired in order.
  assert 0 < np.sum(t >= 0) < np.sum(s >= 0) and np.all(t[np.sum(t >= 0):] == -1)
  np.testing.assert_array_equal(batch["input_ids"][by_id["known"], s[t >= 0] + 1],
                                batch["teacher_input_ids"][by_id["known"], t[t >= 0] + 1])
  assert np.all(batch["teacher_target_positions"][by_id["unknown"]] == -1)
  assert np.sum(batch["target_positions"][by_id["unknown"]] >= 0) > 0  # its CE stays
  old = [{k: v for k, v in r.items() if k != "transcripts"} for r in records]
  with pytest.raises(UserError, match="holds no `transcripts`.*data build instructions"):
    _batch(Records("instructions", old), tokenizer_dir, 2, seq_len=96)


# ---- a short run ---------------------------------------------------------------------------


def test_kd_training_through_the_trainer(tokenizer_dir, tmp_path, assets):
  """Stage 1 with loss "kd" on a built ASR dataset of two clips (each step sees both): the KD term
  is logged and goes down."""
  rows = [json.loads(line) for line in open(os.path.join(assets, "manifest.jsonl"), encoding="utf-8")]
  english = [r for r in rows if r.get("language", "en") == "en"][:2]
  manifest = tmp_path / "manifest.jsonl"
  manifest.write_text("\n".join(json.dumps({**r, "audio": os.path.join(assets, r["audio"])}) for r in english))
  data = builders.build("asr", builders.manifest_rows(str(manifest)), str(tmp_path / "asr"), quiet=True)
  model = tiny_model("encoder")
  config = tiny_config(stage=1, steps=8, loss="kd", batch_size=2)
  config.model = {"preset": "tiny_encoder", "llm": {"vocab_size": model.llm.vocab_size},
                  "audio_patch_id": model.audio_patch_id, "audio_start_id": model.audio_start_id,
                  "audio_end_id": model.audio_end_id}
  config.optim.update(dict(lr=1e-3, warmup_steps=0))
  config.data.update(dict(source="tfds", dir=data.path, tokenizer=tokenizer_dir, system="", seq_len=256,
                          mel_frames=800, workers=-1))
  summary = trainer.train(config, str(tmp_path / "work"))
  assert summary["stop_reason"] == "finished" and summary["step"] == 8
  kd = [h["kd"] for h in summary["history"]]
  assert all(np.isfinite(kd)) and [h["loss"] for h in summary["history"]] == kd
  assert all(h["ce"] > 1 for h in summary["history"])  # logged, and not what this loss trains
  # Adam's first step moves every adaptor weight by lr and overshoots; from there the KL falls
  # (a random LLM's distributions are flat, so the KL is small: ~8e-4 at the start).
  # Each step draws other stage-1 instructions for the two clips, so the curve is not monotone.
  assert kd[-1] < 0.75 * kd[0] and np.mean(kd[4:]) < 0.6 * np.mean(kd[:4]), kd
