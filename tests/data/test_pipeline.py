"""grain pipeline: the batch contract, audio slots and markers, shards, exact resume, end to end from a built dataset."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from llasm_jax import tokens
from llasm_jax import sharding
from llasm_jax.sharding import DEFAULT_RULES
from llasm_jax.data import builders, contract, global_batch, pipeline
from llasm_jax.data.audio import from_int16
from llasm_jax.errors import UserError
from llasm_jax.tokens import IGNORE
from llasm_jax.train import data_config
from tests.conftest import assert_close
from tests.data.conftest import tiny_model

CONTRACT = {"input_ids": np.int32, "labels": np.int32, "attention_mask": np.int32, "positions": np.int32,
            "target_positions": np.int32, "mel": np.float32, "mel_lengths": np.int32}


class IndexSource:
  """ASR records whose transcript names the record ("sample 7"), with a short tone each."""

  kind = "asr"

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    t = np.arange(4000) / 16000
    audio = (3000 * np.sin(2 * np.pi * (200 + 10 * i) * t)).astype(np.int16)
    return {"audio": audio, "text": f"sample {i}".encode(), "language": b"en"}


def check_contract(batch, model, cfg, b):
  assert set(batch) == set(CONTRACT)
  for k, dtype in CONTRACT.items():
    assert batch[k].dtype == dtype, k
  t = batch["input_ids"].shape[1]
  assert batch["mel"].shape == (b, cfg.max_audios, cfg.num_mel_bins, cfg.frames)
  assert batch["mel_lengths"].shape == (b, cfg.max_audios)
  for k in ("labels", "attention_mask", "positions"):
    assert batch[k].shape == (b, t)
  # The target slots: each row's positions whose next label is a target, in order, -1 padded.
  for row, slots in zip(batch["labels"], batch["target_positions"]):
    want = np.flatnonzero(row[1:] != tokens.IGNORE)
    assert slots[:len(want)].tolist() == want.tolist() and np.all(slots[len(want):] == -1)
  mask = batch["attention_mask"]
  n = mask.sum(1)
  assert np.all(mask == (np.arange(t)[None] < n[:, None]))  # right padding
  assert np.all(batch["labels"][mask == 0] == IGNORE)
  real = (batch["labels"] != IGNORE)
  assert np.all(batch["labels"][real] == batch["input_ids"][real])
  assert np.all(batch["positions"] == np.arange(t)[None])
  lengths = batch["mel_lengths"]
  for row in range(b):  # filled slots first, their mel zero past their length, empty slots zero
    filled = int(np.sum(lengths[row] > 0))
    assert np.all(lengths[row, :filled] > 0) and np.all(lengths[row, filled:] == 0)
    for j in range(cfg.max_audios):
      assert not np.any(batch["mel"][row, j, :, lengths[row, j]:])
  contract.check_batch(batch, model)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_llasm_mode_batches(tokenizer_dir):
  model = tiny_model("llasm")
  cfg = pipeline.PipelineConfig.from_model(model, seq_len=512, buckets=(384, 512), max_audios=2)
  with pipeline.make_iterator(pipeline.SyntheticSource("asr", 16, seed=1), cfg, tokenizer_dir, batch_size=4,
                              shard_index=0, shard_count=1) as it:
    for batch in take(it, 5):
      check_contract(batch, model, cfg, 4)
      assert batch["input_ids"].shape[1] in (384, 512)
      assert np.all(batch["mel_lengths"] == [[3000, 0]] * 4)
      assert np.all(np.sum(batch["input_ids"] == model.audio_patch_id, 1) == 8)  # audio_token_len of "tiny"


def test_encoder_mode_windows_slots_and_cuts(tokenizer_dir):
  model = tiny_model("encoder")
  # 3 s windows: clips of 2..7 s take 1..3 slots each; conversations of up to 3 clips overflow 4 slots.
  cfg = pipeline.PipelineConfig.from_model(model, seq_len=1024, max_audios=4, mel_frames=300)
  src = pipeline.SyntheticSource("instructions", 12, seed=2, seconds=(2.0, 7.0), max_turns=3)
  with pipeline.make_iterator(src, cfg, tokenizer_dir, batch_size=3, shard_index=0, shard_count=1) as it:
    batches = take(it, 4)
  slots = np.concatenate([b["mel_lengths"] for b in batches])
  assert slots.max() == 300 and np.any((slots > 0) & (slots < 300)) and np.any(slots[:, 3] > 0)
  for b in batches:
    check_contract(b, model, cfg, 3)
    # P follows each window's length: tokens of the <au_patch> spans = sum of audio_tokens(frames).
    for row in range(3):
      want = sum(model.audio_tokens(int(f)) for f in b["mel_lengths"][row] if f > 0)
      assert np.sum(b["input_ids"][row] == model.audio_patch_id) == want
  # Short sequences: cut at seq_len, whole audio spans only.
  cfg = pipeline.PipelineConfig.from_model(model, seq_len=320, max_audios=4, mel_frames=300)
  with pipeline.make_iterator(src, cfg, tokenizer_dir, batch_size=3, shard_index=0, shard_count=1) as it:
    for b in take(it, 4):
      check_contract(b, model, cfg, 3)
      assert b["input_ids"].shape[1] == 320


def texts(batches, tokenizer):
  out = []
  for b in batches:
    for ids, labels in zip(b["input_ids"], b["labels"]):
      out.append(tokenizer.decode(ids[labels != IGNORE], skip_special_tokens=True).strip())
  return out


@pytest.mark.parametrize("drop", [False, True], ids=["keep_remainder", "equal_shards"])
def test_shards_are_disjoint_and_cover_the_data(tokenizer_dir, tokenizer, drop):
  cfg = pipeline.PipelineConfig.from_model(tiny_model(), seq_len=384)
  seen = []
  for shard in range(2):
    with pipeline.make_iterator(IndexSource(11), cfg, tokenizer_dir, batch_size=1, num_epochs=1, seed=5,
                                shard_index=shard, shard_count=2, drop_shard_remainder=drop) as it:
      seen.append(texts(list(it), tokenizer))
  a, b = set(seen[0]), set(seen[1])
  assert len(a) == len(seen[0]) and len(b) == len(seen[1]) and not a & b
  everything = {f"sample {i}" for i in range(11)}
  if drop:
    assert len(a) == len(b) == 5 and a | b < everything
  else:
    assert a | b == everything


def test_resume_equals_uninterrupted_run(tokenizer_dir):
  cfg = pipeline.PipelineConfig.from_model(tiny_model(), seq_len=512, buckets=(384, 512))
  src = pipeline.SyntheticSource("asr", 20, seed=3)
  kw = dict(batch_size=4, seed=11, shard_index=0, shard_count=1)
  with pipeline.make_iterator(src, cfg, tokenizer_dir, **kw) as it:
    full = take(it, 9)  # 5 batches per epoch: crosses into a reshuffled second epoch
  with pipeline.make_iterator(src, cfg, tokenizer_dir, **kw) as it:
    first = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  # Resume in worker processes: the state does not depend on how batches were produced.
  with pipeline.make_iterator(src, cfg, tokenizer_dir, workers=2, **kw) as it:
    it.set_state(state)
    rest = take(it, 6)
  assert state["step"] == 3
  for a, b in zip(full, first + rest):
    for k in CONTRACT:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # A different seed gives different batches (the comparison above is not vacuous).
  with pipeline.make_iterator(src, cfg, tokenizer_dir, **dict(kw, seed=12)) as it:
    assert not np.array_equal(take(it, 1)[0]["input_ids"], full[0]["input_ids"])


@pytest.fixture(scope="module")
def assets_dataset(tmp_path_factory, assets):
  out = tmp_path_factory.mktemp("assets_ds")
  result = builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")), str(out),
                          quiet=True)
  return result.path


def test_end_to_end_from_built_dataset(assets_dataset, tokenizer_dir, tokenizer):
  model = tiny_model("llasm")
  cfg = pipeline.PipelineConfig.from_model(model, seq_len=512)
  source = pipeline.Source(os.path.dirname(os.path.dirname(assets_dataset)))  # the --out folder works too
  assert source.kind == "asr" and len(source) == 7
  records = {}
  for i in range(len(source)):
    r = source[i]
    records[r["text"].decode()] = from_int16(r["audio"])
  fe = WhisperFeatureExtractor(feature_size=80)
  with pipeline.make_iterator(source, cfg, tokenizer_dir, batch_size=2, shard_index=0, shard_count=1) as it:
    for batch in take(it, 3):
      check_contract(batch, model, cfg, 2)
      for row, text in enumerate(texts([batch], tokenizer)):
        ref = fe(records[text], sampling_rate=16000, return_tensors="np").input_features[0]
        assert_close(batch["mel"][row, 0], ref, 1e-4)


def test_train_iterator_and_global_arrays(assets_dataset, tokenizer_dir):
  model = tiny_model("encoder")
  config = ml_collections.ConfigDict({
      "train": {"init_from": tokenizer_dir},
      "data": {"source": "tfds", "dir": assets_dataset, "seq_len": 256, "max_audios": 2, "mel_frames": 1000,
               "num_examples": 0, "seed": 0, "workers": 0},
  })
  it = data_config.train_iterator(config, model, host_batch=2)
  try:
    batch = next(it)
  finally:
    it.close()
  check_contract(batch, model, pipeline.PipelineConfig.from_model(model, seq_len=256, max_audios=2, mel_frames=1000), 2)
  assert batch["input_ids"].shape == (2, 256)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  arrays = global_batch.to_global(batch, mesh, DEFAULT_RULES)
  for k, v in arrays.items():
    assert isinstance(v, jax.Array) and v.shape == batch[k].shape and v.dtype == batch[k].dtype
    np.testing.assert_array_equal(np.asarray(v), batch[k])
    assert v.sharding.spec[0] == ("data", "fsdp")
  padded = global_batch.pad_length(batch, 300)
  assert padded["input_ids"].shape == (2, 300) and np.all(padded["labels"][:, 256:] == IGNORE)
  assert np.all(padded["attention_mask"][:, 256:] == 0) and np.all(padded["positions"][0] == np.arange(300))


def test_config_errors():
  with pytest.raises(UserError, match="buckets"):
    pipeline.PipelineConfig(seq_len=512, buckets=(256, 384))
  with pytest.raises(UserError, match="mel_frames"):
    pipeline.PipelineConfig(mode="encoder", mel_frames=4000)
  with pytest.raises(FileNotFoundError, match="dataset_info.json"):
    pipeline.Source("/nonexistent/folder")


# A ChatML template that writes its own system prompt when the conversation has none (as SmolLM2's does).
CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nyou are a sample model<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("system", [None, "", "be brief"], ids=["default", "empty", "text"])
def test_config_data_system_reaches_the_batches(tokenizer_dir, system):
  """config.data.system None or "" (--config.data.system=) with a chat template: no system message,
  so the chat template writes its own default (LLaSM's belongs to the LLaSM templates); a text
  is written as the system message."""
  from transformers import AutoTokenizer

  from llasm_jax.config import apply_overrides
  from llasm_jax.train.sections import training_sections
  from tests.data.conftest import SYSTEM

  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  tok.chat_template = CHATML_DEFAULT_SYSTEM
  config = ml_collections.ConfigDict(training_sections(1))
  apply_overrides(config, ["--config.data.template=chat-template", "--config.data.seq_len=256"] +
                  ([] if system is None else [f"--config.data.system={system}"]))
  assert config.data.system == system
  model = tiny_model()
  cfg = data_config.pipeline_config(config, model)
  assert cfg.system == system and cfg.template == "chat-template"
  with pipeline.make_iterator(IndexSource(4), cfg, tok, batch_size=2, shard_index=0, shard_count=1) as it:
    batch = next(it)
  for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
    text = tok.decode(ids[mask == 1])
    assert text.startswith("<|im_start|>system\n")
    assert SYSTEM not in text
    assert ("you are a sample model" in text) == (not system)
    assert ("be brief" in text) == bool(system)


def test_eval_prompts_use_the_training_system_prompt(assets_dataset, tokenizer_dir):
  """`LlasmAnswers.for_source(system=...)` and `TrainingEval` (config.data.system) prompt as training did."""
  import types

  from llasm_jax.infer.evaluate import LlasmAnswers
  from llasm_jax.train.evaluation import TrainingEval
  from llasm_jax.infer.generator import Generator
  from llasm_jax.train.sections import training_sections
  from tests.data.conftest import SYSTEM

  tok = tokens.load_tokenizer(tokenizer_dir)
  generator = Generator(types.SimpleNamespace(audio_cfg=tiny_model()), tok, template="llasm-cllama2")
  source = pipeline.Source(assets_dataset)
  for system, want in [(None, SYSTEM), ("", None), ("be brief", "be brief")]:
    answers = LlasmAnswers.for_source(generator, source, system=system)
    text = tok.decode(answers.prompt(source[0])[0])
    assert (SYSTEM in text) == (system is None)
    if want:
      assert text.count(want) == 2  # llasm-cllama2 writes the system block twice
  # The model folder's record (what training used) is the default; the caller's choice beats it.
  recorded = Generator(types.SimpleNamespace(audio_cfg=tiny_model()), tok,
                       recorded={"template": "llasm-baichuan", "system": "be brief"})
  answers = LlasmAnswers.for_source(recorded, source)
  assert (answers.pcfg.template, answers.pcfg.system) == ("llasm-baichuan", "be brief")
  text = tok.decode(answers.prompt(source[0])[0])
  assert text.count("be brief") == 1 and "USER:" in text and SYSTEM not in text
  answers = LlasmAnswers.for_source(recorded, source, template="llasm-cllama2")
  assert (answers.pcfg.template, answers.pcfg.system) == ("llasm-cllama2", None)
  config = ml_collections.ConfigDict(training_sections(1))
  config.data.update(dict(tokenizer=tokenizer_dir, system=""))
  config.eval.update(dict(every=1, data=assets_dataset, limit=1))
  assert TrainingEval(config, tiny_model(), None, None).system == ""
