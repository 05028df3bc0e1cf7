"""`llasm-jax data encode`: cached features against PyTorch Whisper on HF log-mel, slots, metadata, refusals."""

import json
import os

import numpy as np
import pytest
import torch
import transformers as tf

from llasm_jax import cli
from llasm_jax.data import builders, encode, pipeline
from llasm_jax.data.audio import from_int16
from llasm_jax.errors import UserError
from tests.conftest import assert_close
from tests.train.test_cached import llasm_folders

WINDOW = 300  # encoder mode: 3 s windows, so 2.9-4.5 s clips take one or two slots
CONVERSATIONS = [  # spoken human turns (the audio replaces the turn's text), 1 or 2 audios per row
    {"id": "two_turns", "conversations": [
        {"from": "human", "value": "hello", "audio": "speech_en/hello_world.wav"}, {"from": "gpt", "value": "hi"},
        {"from": "human", "value": "and the weather?", "audio": "speech_en/weather.flac"},
        {"from": "gpt", "value": "sunny"}]},
    {"id": "one_turn", "conversations": [
        {"from": "human", "value": "<audio>\ncount please", "audio": "speech_en/counting.ogg"},
        {"from": "gpt", "value": "one two three"}]},
    {"id": "zh", "conversations": [
        {"from": "human", "value": "q", "audio": ["speech_zh/llasm_example_0.mp3", "speech_zh/llasm_example_1.mp3"]},
        {"from": "gpt", "value": "a"}]},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory, assets):
  root = tmp_path_factory.mktemp("encode")
  convs = root / "convs.jsonl"
  convs.write_text("\n".join(json.dumps(c) for c in CONVERSATIONS))
  raw = {"asr": builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")),
                               str(root / "asr"), quiet=True).path,
         "instructions": builders.build("instructions", builders.instruction_rows(str(convs), assets),
                                        str(root / "instructions"), quiet=True).path}
  return dict(root=root, raw=raw, ckpts=llasm_folders(root),
              whisper=tf.WhisperModel.from_pretrained(str(root / "hf_whisper")).eval())


def torch_features(whisper, audio, mode):
  """PyTorch Whisper on HF log-mel of one slot: float[S, E] (what the adaptor reads)."""
  fe = tf.WhisperFeatureExtractor(feature_size=80)
  with torch.no_grad():
    if mode == "llasm":  # 30 s padded mel, the decoder over 64 start tokens (the released path)
      mel = torch.tensor(fe(audio, sampling_rate=16000, return_tensors="np").input_features)
      start = torch.full((1, 64), whisper.config.decoder_start_token_id)
      return whisper(input_features=mel, decoder_input_ids=start).last_hidden_state[0].numpy()
    # Encoder mode: the window alone, unpadded. HF's forward insists on 3000 frames, so its
    # modules run here with the positions sliced (conv2's own padding covers an odd frame count).
    mel = torch.tensor(fe(audio, sampling_rate=16000, padding="longest", return_tensors="np").input_features)
    enc = whisper.encoder
    x = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(mel)))).permute(0, 2, 1)
    x = x + enc.embed_positions.weight[:x.shape[1]]
    for layer in enc.layers:
      x = layer(x, None)
    return enc.layer_norm(x)[0].numpy()


def windows(audio, mode):
  """The slots of one audio, cut independently of the package: 3 s pieces in encoder mode."""
  if mode == "llasm":
    return [audio]
  pieces = [audio[i:i + WINDOW * 160] for i in range(0, len(audio), WINDOW * 160)]
  assert len(pieces[-1]) >= 1600  # no padded tail in these clips (the package pads tails under 0.1 s)
  return pieces


@pytest.mark.parametrize("mode, kind", [("llasm", "asr"), ("encoder", "instructions")])
def test_cached_features_equal_pytorch_whisper(data, mode, kind, capsys):
  out = data["root"] / f"cache_{mode}_{kind}"
  assert cli.main(["data", "encode", "--ckpt", data["ckpts"][mode], "--data", data["raw"][kind], "--out", str(out),
                   "--dtype", "float32", "--batch", "4", "--mel-frames", str(WINDOW)]) == 0
  printed = capsys.readouterr().out
  raw, cached = pipeline.Source(data["raw"][kind]), pipeline.Source(str(out))
  assert cached.kind == kind and len(cached) == len(raw) and f"encoded {len(raw) if kind == 'asr' else 5} audios" in printed
  marker = cached.cache
  assert marker["mode"] == mode and marker["dtype"] == "float32" and marker["feature_dim"] == 64
  assert marker["mel_frames"] == (3000 if mode == "llasm" else WINDOW) and len(marker["whisper"]["fingerprint"]) == 16
  rows = {(raw[i]["id"], raw[i]["source"]): raw[i] for i in range(len(raw))}  # ids repeat (weather.wav/.flac)
  slots_seen = []
  for i in range(len(cached)):
    row = cached[i]
    ref = rows[row["id"], row["source"]]
    assert "audio" not in row
    assert kind == "asr" or "transcripts" in row  # what the distillation teacher reads in place of the audio
    for key in set(ref) - {"audio", "audio_lengths"}:  # text fields copied as they are
      np.testing.assert_array_equal(row[key], ref[key], err_msg=key)
    audio = from_int16(ref["audio"])
    bounds = np.cumsum([0] + ([len(audio)] if kind == "asr" else ref["audio_lengths"].tolist()))
    pieces = [windows(audio[a:b], mode) for a, b in zip(bounds[:-1], bounds[1:])]
    flat = [p for per_audio in pieces for p in per_audio]
    assert row["slots"].tolist() == [len(p) for p in pieces]
    assert row["mel_lengths"].tolist() == [3000 if mode == "llasm" else len(p) // 160 for p in flat]
    want = [torch_features(data["whisper"], p, mode) for p in flat]
    assert row["feature_lengths"].tolist() == [len(w) for w in want]
    assert row["features"].dtype == np.float32
    assert_close(row["features"], np.concatenate(want), atol=2e-5)
    slots_seen += row["slots"].tolist()
  if mode == "encoder":
    assert max(slots_seen) == 2  # some audio took two windows


def test_bfloat16_cache_and_refusals(data, tokenizer_dir):
  raw = data["raw"]["asr"]
  out = str(data["root"] / "bf16")
  result = encode.encode(data["ckpts"]["encoder"], raw, out, dtype="bfloat16", batch_size=2, mel_frames=WINDOW,
                         quiet=True)
  assert result.report["audios"] == 7 and result.report["slots"] == 12
  cached = pipeline.Source(out)
  assert cached[0]["features"].dtype.name == "bfloat16"
  # The pipeline refuses the wrong audio input for a dataset, and an encode of a cache.
  model = cli_model(data["ckpts"]["encoder"])
  cfg = pipeline.PipelineConfig.from_model(model, seq_len=512, mel_frames=WINDOW)
  with pytest.raises(UserError, match="holds cached Whisper features and no audio"):
    pipeline.make_iterator(cached, cfg, data["ckpts"]["encoder"], batch_size=2, shard_index=0, shard_count=1)
  with pytest.raises(UserError, match="holds raw audio; cache its Whisper outputs first"):
    pipeline.make_iterator(raw, pipeline.PipelineConfig.from_model(model, features="cached"), data["ckpts"]["encoder"],
                           batch_size=2, shard_index=0, shard_count=1)
  with pytest.raises(UserError, match="already holds cached features"):
    encode.encode(data["ckpts"]["encoder"], out, str(data["root"] / "again"), quiet=True)
  with pytest.raises(FileExistsError, match="exists"):
    encode.encode(data["ckpts"]["encoder"], raw, out, quiet=True)
  with pytest.raises(UserError, match="multiple of data x fsdp"):
    encode.encode(data["ckpts"]["encoder"], raw, str(data["root"] / "odd"), batch_size=0, quiet=True)


def cli_model(ckpt):
  from llasm_jax import checkpoint

  return checkpoint.config_from_dict("llasm", checkpoint.read_meta(ckpt)["config"])


TWO_PROCESSES = """
import os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("127.0.0.1:" + os.environ["PORT"], num_processes=2, process_id=int(os.environ["PROC"]))
sys.path.insert(0, os.environ["ROOT"])
from llasm_jax.data import encode
encode.encode(os.environ["CKPT"], os.environ["DATA"], os.environ["OUT"], dtype="float32", batch_size=2,
              mel_frames=int(os.environ["WINDOW"]), quiet=True)
"""


@pytest.mark.slow
def test_two_processes_encode_their_shares_into_one_dataset(data, tmp_path):
  import subprocess
  import sys

  from tests.train.test_train import ROOT, _free_port

  ckpt, raw = data["ckpts"]["encoder"], data["raw"]["asr"]
  script = tmp_path / "encode.py"
  script.write_text(TWO_PROCESSES)
  env = dict(os.environ, ROOT=ROOT, PORT=str(_free_port()), CKPT=ckpt, DATA=raw, OUT=str(tmp_path / "two"),
             WINDOW=str(WINDOW), JAX_PLATFORMS="cpu")
  runs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, PROC=str(i)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]
  for r in runs:
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-4000:]
  one = encode.encode(ckpt, raw, str(tmp_path / "one"), dtype="float32", batch_size=2, mel_frames=WINDOW, quiet=True)
  two, ref = pipeline.Source(str(tmp_path / "two")), pipeline.Source(one.path)
  files = sorted(f for f in os.listdir(two.paths[0]) if ".array_record-" in f)
  assert len(files) == 2 and len(two) == len(ref) == 7 and two.cache == {**ref.cache, "checkpoint": two.cache["checkpoint"]}
  want = {(ref[i]["id"], ref[i]["source"]): ref[i] for i in range(len(ref))}
  for i in range(len(two)):
    row = two[i]
    expected = want.pop((row["id"], row["source"]))
    np.testing.assert_array_equal(row["mel_lengths"], expected["mel_lengths"])
    assert_close(row["features"], expected["features"], atol=1e-6)
  assert not want


def test_fingerprint_counts_negative_zero_as_zero():
  # Training adds zero updates to the frozen Whisper, which turns -0.0 into +0.0: still the same weights.
  w = np.array([[-0.0, 1.5], [2.0, -3.0]], np.float32)
  same = encode.whisper_fingerprint({"encoder": {"w": w}})
  assert encode.whisper_fingerprint({"encoder": {"w": w + 0.0}}) == same
  assert encode.whisper_fingerprint({"encoder": {"w": np.nextafter(w, 1).astype(np.float32)}}) != same
