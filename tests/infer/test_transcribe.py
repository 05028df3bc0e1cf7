"""Greedy Whisper transcription against `transformers` `WhisperForConditionalGeneration.generate`."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tokenizers
import torch
import transformers as tf

from llasm_jax.convert.convert import convert
from llasm_jax.data.audio import synth_speech
from llasm_jax.data.features import log_mel
from llasm_jax.infer.transcribe import Transcriber, WhisperTokens
from tests.models.test_whisper import randomize_biases, tiny_whisper_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 120
# <|notimestamps|> last: ids above it would be timestamps, which make transformers re-seek (long-form style).
EOT, SOT, EN, ZH, DE, TRANSLATE, TRANSCRIBE, NO_TS = 99, 100, 101, 102, 103, 104, 105, 119
# Tokens the random model likes (found by running it without suppression): masking them matters.
SUPPRESS = [5, 17, 70, TRANSLATE]
BEGIN_SUPPRESS = [21, 51, EOT]
SPECIAL = {EOT: "<|endoftext|>", SOT: "<|startoftranscript|>", EN: "<|en|>", ZH: "<|zh|>", DE: "<|de|>",
           TRANSLATE: "<|translate|>", TRANSCRIBE: "<|transcribe|>", NO_TS: "<|notimestamps|>"}


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
  """One word per id ("w7"), Whisper's special tokens at their ids; decode joins words by spaces."""
  vocab = {SPECIAL.get(i, f"w{i}"): i for i in range(VOCAB)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL.values()])
  return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="w0")


def tiny_whisper(multilingual: bool) -> tf.WhisperForConditionalGeneration:
  """Random weights large enough (init_std 0.3) that greedy decoding wanders over the vocab, the
  <|endoftext|> row scaled so that some rows end early and others run to the limit, and a
  generation config laid out like openai's."""
  cfg = tiny_whisper_config()
  cfg.vocab_size, cfg.init_std = VOCAB, 0.3
  # pad stays 0: the pad row of the embeddings is zero, so an <|endoftext|> pad could never win.
  cfg.decoder_start_token_id, cfg.eos_token_id, cfg.bos_token_id = SOT, EOT, EOT
  torch.manual_seed(0)
  model = tf.WhisperForConditionalGeneration(cfg).eval()
  randomize_biases(model)
  with torch.no_grad():
    model.model.decoder.embed_tokens.weight[EOT] *= 0.7
  g = model.generation_config
  g.decoder_start_token_id, g.eos_token_id, g.pad_token_id = SOT, EOT, EOT
  g.no_timestamps_token_id, g.max_length = NO_TS, cfg.max_target_positions
  g.suppress_tokens, g.begin_suppress_tokens = SUPPRESS, BEGIN_SUPPRESS
  g.is_multilingual = multilingual
  if multilingual:
    g.lang_to_id = {"<|en|>": EN, "<|zh|>": ZH, "<|de|>": DE}
    g.task_to_id = {"transcribe": TRANSCRIBE, "translate": TRANSLATE}
  return model


@pytest.fixture(scope="module", params=[True, False], ids=["multilingual", "english"])
def whisper(request, tmp_path_factory):
  root = tmp_path_factory.mktemp("whisper")
  model = tiny_whisper(request.param)
  model.save_pretrained(root / "hf")
  tiny_tokenizer().save_pretrained(root / "hf")
  convert(whisper_dir=str(root / "hf"), out=str(root / "ck"), progress=False)
  return model, Transcriber.load(str(root / "ck")), root


def clips(seconds=(1.0, 2.5, 4.0, 0.6, 3.2)):
  return [synth_speech(s, seed=i) for i, s in enumerate(seconds)]


def hf_generate(model, audios, max_new_tokens, **kw) -> list[list[int]]:
  """transformers' greedy tokens, cut before <|endoftext|>."""
  mel = torch.tensor(np.stack([log_mel(a) for a in audios]))
  with torch.no_grad():
    out = model.generate(mel, max_new_tokens=max_new_tokens, **kw).tolist()
  return [row[:row.index(EOT)] if EOT in row else row for row in out]


def test_tokens_equal_transformers_generate(whisper):
  model, tr, _ = whisper
  audios = clips()
  mels = [log_mel(a) for a in audios]
  multilingual = tr.tokens.multilingual
  runs = [dict(language=None)]
  if multilingual:
    runs += [dict(language="en"), dict(language="de")]
  refs = []
  for kw in runs:
    hf_kw = dict(task="transcribe", **kw) if multilingual else {}
    ref = hf_generate(model, audios, 32, **hf_kw)
    ids, langs = tr.generate_ids(mels, [kw["language"]] * len(mels), max_new_tokens=32)
    assert ids == ref, (kw, ids, ref)
    if multilingual and kw["language"] is None:
      with torch.no_grad():
        detected = model.detect_language(torch.tensor(np.stack(mels))).tolist()
      assert langs == detected and len(set(detected)) > 1
    refs += ref
  # The check has teeth: rows differ, some end early, others run to the limit, and the
  # suppression changes the tokens.
  assert len({tuple(r) for r in refs}) > len(refs) // 2
  assert min(map(len, refs)) < 32 and max(map(len, refs)) == 32
  assert not any(t in SUPPRESS for r in refs for t in r) and not any(r[0] in BEGIN_SUPPRESS for r in refs if r)
  free = hf_generate(model, audios, 32, suppress_tokens=None, begin_suppress_tokens=None,
                     **(dict(task="transcribe") if multilingual else {}))
  assert free != ref


def test_per_audio_languages_and_batching(whisper):
  model, tr, _ = whisper
  if not tr.tokens.multilingual:
    with pytest.raises(ValueError, match="English-only"):
      tr.generate_ids([log_mel(clips()[0])], ["zh"])
    return
  audios = clips()
  langs = ["en", None, "zh", "german", "<|en|>"]
  ref = []
  for a, lang in zip(audios, langs):  # one at a time: HF takes one language per call
    code = {"german": "de", "<|en|>": "en"}.get(lang, lang)
    ref += hf_generate(model, [a], 24, task="transcribe", language=code)
  # batch_size 2: three calls, the last one padded with an inactive row.
  for batch in (2, 8):
    ids = []
    for s in range(0, len(audios), batch):
      ids += tr.generate_ids([log_mel(a) for a in audios[s:s + batch]], langs[s:s + batch], max_new_tokens=24)[0]
    assert ids == ref, batch
  with pytest.raises(ValueError, match="not one of this Whisper's 3 languages"):
    tr.language_id("fr")


def test_text_and_long_audio_windows(whisper):
  model, tr, root = whisper
  tok = tf.AutoTokenizer.from_pretrained(root / "hf")
  audios = clips((1.5, 35.0))
  long_windows = [audios[1][:480000], audios[1][480000:]]
  ref_ids = hf_generate(model, [audios[0], *long_windows], 16,
                        **(dict(task="transcribe", language="en") if tr.tokens.multilingual else {}))
  ref = [tok.decode(r, skip_special_tokens=True).strip() for r in ref_ids]
  lang = "en" if tr.tokens.multilingual else None
  texts = tr.transcribe(audios, language=lang, batch_size=2, max_new_tokens=16)
  assert texts == [ref[0], f"{ref[1]} {ref[2]}"]
  assert all(t.startswith("w") for t in texts) and tr.timings.windows == 3
  # A file path goes through the package's audio loader, to the same features.
  import soundfile as sf

  sf.write(root / "clip.wav", audios[0], 16000, subtype="FLOAT")
  assert tr.transcribe([str(root / "clip.wav")], language=lang, max_new_tokens=16) == [ref[0]]


def test_facts_and_errors(whisper, tmp_path):
  _, tr, root = whisper
  gen = json.loads((root / "ck" / "whisper" / "generation_config.json").read_text())
  tokens = WhisperTokens.from_generation_config(gen, tr.cfg)
  assert tokens == tr.tokens and tokens.suppress == tuple(SUPPRESS) and tokens.eos == EOT
  assert tokens.prompt(EN) == ([SOT, EN, TRANSCRIBE, NO_TS] if tokens.multilingual else [SOT, NO_TS])
  with pytest.raises(ValueError, match="max_new_tokens 99"):
    tr.generate_ids([log_mel(clips()[0])], max_new_tokens=99)
  with pytest.raises(FileNotFoundError, match="no such folder"):
    Transcriber.load(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def llasm_folders(tmp_path_factory):
  """A "llasm"-mode and an "encoder"-mode LLaSM folder around the multilingual tiny Whisper."""
  from tests.infer.conftest import tiny_tokenizer as llm_tokenizer

  root = tmp_path_factory.mktemp("llasm")
  tiny_whisper(True).save_pretrained(root / "hf_whisper")
  tiny_tokenizer().save_pretrained(root / "hf_whisper")
  tok = llm_tokenizer()
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2))
  llm.save_pretrained(root / "hf_llm")
  tok.save_pretrained(root / "hf_llm")
  out = {}
  for mode in ("llasm", "encoder"):
    out[mode] = str(root / mode)
    convert(str(root / "hf_llm"), str(root / "hf_whisper"), out=out[mode], mode=mode, progress=False)
  convert(str(root / "hf_llm"), out=str(root / "llama"), progress=False)
  convert(whisper_dir=str(root / "hf_whisper"), out=str(root / "whisper"), progress=False)
  out.update(llama=str(root / "llama"), whisper=str(root / "whisper"))
  return out


def test_the_whisper_inside_a_llasm_folder(llasm_folders):
  audios = clips()[:3]
  inner = Transcriber.load(llasm_folders["llasm"])
  assert inner.transcribe(audios, max_new_tokens=12) == Transcriber.load(llasm_folders["whisper"]).transcribe(
      audios, max_new_tokens=12)
  assert inner.tokenizer.convert_ids_to_tokens(SOT) == "<|startoftranscript|>"  # Whisper's, not the LLM's
  with pytest.raises(ValueError, match="'encoder'-mode LLaSM, whose Whisper has no decoder"):
    Transcriber.load(llasm_folders["encoder"])
  with pytest.raises(ValueError, match="text-only LLM"):
    Transcriber.load(llasm_folders["llama"])


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import numpy as np
    from llasm_jax import sharding
    from llasm_jax.config import DEFAULT_RULES
    from llasm_jax.data.audio import synth_speech
    from llasm_jax.infer.transcribe import Transcriber
    audios = [synth_speech(s, seed=i) for i, s in enumerate((1.0, 2.5, 4.0))]
    one = Transcriber.load(sys.argv[1]).transcribe(audios, max_new_tokens=12)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    sharded = Transcriber.load(sys.argv[1], mesh=mesh, rules=DEFAULT_RULES)
    assert sharded.transcribe(audios, max_new_tokens=12) == one, one
    print("OK", one)
""")


def test_sharded_transcription_equals_one_device(llasm_folders, tmp_path):
  script = tmp_path / "sharded.py"
  script.write_text(SHARDED)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, str(script), llasm_folders["whisper"]], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  assert "OK" in res.stdout
