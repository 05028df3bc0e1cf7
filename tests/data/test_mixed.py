"""A Source over asr and instructions datasets together ("mixed"): stage 1 on transcripts and spoken
questions at once, raw or cached."""

import json
import os

import numpy as np
import pytest

from llasm_jax.data import builders, encode, pipeline, sources
from llasm_jax.errors import UserError
from tests.train.test_cached import llasm_folders

QUESTIONS = [{"id": f"q{i}", "conversations": [
    {"from": "human", "value": "what is the weather?", "audio": "speech_en/weather.flac"},
    {"from": "gpt", "value": f"answer {i}"}]} for i in range(3)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, assets):
  root = tmp_path_factory.mktemp("mixed")
  convs = root / "questions.jsonl"
  convs.write_text("\n".join(json.dumps(c) for c in QUESTIONS))
  asr = builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")), str(root / "asr"),
                       quiet=True).path
  questions = builders.build("instructions", builders.instruction_rows(str(convs), assets), str(root / "q"),
                             quiet=True).path
  return dict(root=root, asr=asr, questions=questions, ckpt=llasm_folders(root)["encoder"])


def replies(source, ckpt, features):
  """The reply text of every sample of one epoch of `source`, decoded."""
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(ckpt)
  cfg = pipeline.PipelineConfig.from_model(pipeline_model(ckpt), seq_len=4096, template="llasm-cllama2",
                                           features=features, mel_frames=3000)
  out = []
  with pipeline.make_iterator(source, cfg, ckpt, batch_size=len(source), num_epochs=1, shard_index=0,
                              shard_count=1) as it:
    batch = next(it)
  for ids, labels in zip(batch["input_ids"], batch["labels"]):
    out.append(tok.decode(ids[labels != -100], skip_special_tokens=True).strip())
  return sorted(out)


def pipeline_model(ckpt):
  from llasm_jax import checkpoint

  return checkpoint.config_from_dict("llasm", checkpoint.read_meta(ckpt)["config"])


def test_mixed_source_raw_and_cached(data, assets):
  source = pipeline.Source(f"{data['asr']},{data['questions']}")
  assert source.kind == sources.MIXED and len(source) == 7 + 3
  assert {source[i][sources.KIND_KEY] for i in range(len(source))} == {"asr", "instructions"}
  transcripts = sorted(json.loads(line)["text"] for line in open(os.path.join(assets, "manifest.jsonl")))
  expected = sorted(transcripts + [f"answer {i}" for i in range(3)])
  raw = replies(source, data["ckpt"], "mel")
  assert len(raw) == 10 and all(f"answer {i}" in raw for i in range(3))

  with pytest.raises(UserError, match="encode each kind on its own"):
    encode.encode(data["ckpt"], f"{data['asr']},{data['questions']}", str(data["root"] / "c"), quiet=True)
  caches = [encode.encode(data["ckpt"], d, str(data["root"] / name), dtype="float32", quiet=True).path
            for name, d in (("c_asr", data["asr"]), ("c_q", data["questions"]))]
  cached = pipeline.Source(",".join(caches))  # two caches of one Whisper: their provenance differs, not features
  assert cached.kind == sources.MIXED and cached.cache is not None
  assert replies(cached, data["ckpt"], "cached") == raw
  # Each reply is a transcript or an answer, none lost or doubled (the tiny tokenizer may respell text).
  assert len(expected) == len(raw)
  assert np.sum(["answer" in r for r in raw]) == 3
