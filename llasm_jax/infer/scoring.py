"""How `llasm-jax eval` scores answers: corpus WER / CER of transcripts, SQuAD token F1 of replies, the Report.

Transcripts are scored over the whole corpus with jiwer (errors over reference units of all rows,
not a mean of per-row rates): WER after Whisper's English text normalizer for English, CER after
its basic normalizer with spaces removed for languages written without word spaces (zh, ja, yue,
th, lo, my, bo), WER after the basic normalizer for the rest. Replies are scored by SQuAD's token
F1 (lower case, punctuation and English articles removed, bag of words; CJK characters count one
token each, as MLQA scores Chinese), averaged over rows.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import string
import unicodedata
from typing import Any, Sequence

import numpy as np

from llasm_jax import paths

CER_LANGUAGES = ("zh", "ja", "yue", "th", "lo", "my", "bo")  # scripts without spaces between words
METRICS = ("wer", "cer", "f1")


def asr_metric(language: str) -> str:
  """"cer" for languages written without word spaces, else "wer"."""
  return "cer" if language.lower().replace("_", "-").split("-")[0] in CER_LANGUAGES else "wer"


@functools.lru_cache(maxsize=None)
def _normalizers():
  from whisper_normalizer.basic import BasicTextNormalizer
  from whisper_normalizer.english import EnglishTextNormalizer

  return EnglishTextNormalizer(), BasicTextNormalizer()


def normalize_transcript(text: str, language: str) -> str:
  """The text as WER / CER compare it: Whisper's English normalizer for English, else its basic
  normalizer, with the spaces removed where the metric is CER."""
  english, basic = _normalizers()
  if language.lower().startswith("en"):
    return " ".join(english(text).split())
  out = basic(text)
  return "".join(out.split()) if asr_metric(language) == "cer" else " ".join(out.split())


def edit_counts(references: Sequence[str], hypotheses: Sequence[str], metric: str) -> dict[str, int]:
  """jiwer's alignment counts over a corpus of normalized texts: words ("wer") or characters ("cer")."""
  import jiwer

  out = (jiwer.process_words if metric == "wer" else jiwer.process_characters)(list(references), list(hypotheses))
  return dict(substitutions=out.substitutions, deletions=out.deletions, insertions=out.insertions, hits=out.hits)


def error_rate(counts: dict[str, int]) -> float:
  """(S + D + I) / N with N = S + D + hits, the reference units; an empty reference counts 1."""
  errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
  return errors / max(1, counts["substitutions"] + counts["deletions"] + counts["hits"])


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_cjk(ch: str) -> bool:
  code = ord(ch)
  return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF or 0xF900 <= code <= 0xFAFF
          or 0x3040 <= code <= 0x30FF)


def answer_tokens(text: str) -> list[str]:
  """SQuAD's answer normalization (lower case, ASCII and Unicode punctuation removed, English
  articles removed, whitespace split), with each CJK character a token of its own (MLQA)."""
  text = "".join(ch for ch in text.lower()
                 if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
  text = _ARTICLES.sub(" ", text)
  out = []
  for word in text.split():
    run = ""
    for ch in word:
      if _is_cjk(ch):
        if run:
          out.append(run)
          run = ""
        out.append(ch)
      else:
        run += ch
    if run:
      out.append(run)
  return out


def answer_f1(hypothesis: str, reference: str) -> float:
  """SQuAD token F1 of a reply against the reference answer; two empty answers agree (1.0)."""
  hyp, ref = answer_tokens(hypothesis), answer_tokens(reference)
  if not hyp or not ref:
    return float(hyp == ref)
  same = sum((collections.Counter(hyp) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(hyp), same / len(ref)
  return 2 * precision * recall / (precision + recall)


@dataclasses.dataclass
class EvalRow:
  """One dataset row: what it asks, the reference, the model's answer and its score."""

  index: int
  id: str
  kind: str  # "asr" or "instructions"
  language: str
  reference: str
  record: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)
  hypothesis: str = ""
  metric: str = ""  # "wer", "cer" or "f1"
  score: float = math.nan  # this row's error rate (wer / cer) or F1
  normalized_reference: str = ""
  normalized_hypothesis: str = ""

  def as_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.pop("record")
    return out


def score(rows: Sequence[EvalRow]) -> dict[str, float]:
  """Fills each row's metric and score; returns the totals: per ASR metric the corpus rate and
  its counts (`wer`, `wer_rows`, `wer_errors`, `wer_units`, ...), for instruction rows the mean `f1`."""
  totals: dict[str, float] = {"rows": len(rows)}
  for row in rows:
    if row.kind == "asr":
      row.metric = asr_metric(row.language)
      row.normalized_reference = normalize_transcript(row.reference, row.language)
      row.normalized_hypothesis = normalize_transcript(row.hypothesis, row.language)
      row.score = error_rate(edit_counts([row.normalized_reference], [row.normalized_hypothesis], row.metric))
    else:
      row.metric = "f1"
      row.normalized_reference = " ".join(answer_tokens(row.reference))
      row.normalized_hypothesis = " ".join(answer_tokens(row.hypothesis))
      row.score = answer_f1(row.hypothesis, row.reference)
  for metric in ("wer", "cer"):
    chosen = [r for r in rows if r.metric == metric]
    if chosen:
      counts = edit_counts([r.normalized_reference for r in chosen], [r.normalized_hypothesis for r in chosen], metric)
      totals[metric] = error_rate(counts)
      totals[f"{metric}_rows"] = len(chosen)
      totals[f"{metric}_errors"] = counts["substitutions"] + counts["deletions"] + counts["insertions"]
      totals[f"{metric}_units"] = counts["substitutions"] + counts["deletions"] + counts["hits"]
  chosen = [r for r in rows if r.metric == "f1"]
  if chosen:
    totals["f1"] = float(np.mean([r.score for r in chosen]))
    totals["f1_rows"] = len(chosen)
  return totals


@dataclasses.dataclass
class Report:
  rows: list[EvalRow]
  totals: dict[str, float]
  timings: dict[str, float]
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict[str, Any]:
    return {**self.info, "totals": self.totals, "timings": self.timings, "rows": [r.as_dict() for r in self.rows]}

  def write(self, path: str) -> None:
    """Writes the JSON report to `path` (local or gs://)."""
    paths.write_json(path, self.as_dict(), ensure_ascii=False, indent=1)

  def summary(self) -> str:
    """One line: the totals, e.g. "wer 12.50% (4 rows, 40 words) | f1 0.613 (3 rows) | 12.3 s"."""
    parts = []
    units = {"wer": "words", "cer": "chars"}
    for metric in ("wer", "cer"):
      if metric in self.totals:
        parts.append(f"{metric} {100 * self.totals[metric]:.2f}% ({self.totals[f'{metric}_rows']} rows, "
                     f"{self.totals[f'{metric}_units']} {units[metric]})")
    if "f1" in self.totals:
      parts.append(f"f1 {self.totals['f1']:.3f} ({self.totals['f1_rows']} rows)")
    if "total_s" in self.timings:
      parts.append(f"{self.timings['total_s']:.1f} s")
    return " | ".join(parts)

  def table(self, worst: int = 5, width: int = 60) -> str:
    """The `worst` rows of each metric (highest error rate, lowest F1), reference and answer cut to `width`."""
    def cut(text):
      text = " ".join(text.split())
      return text if len(text) <= width else text[:width - 1] + "…"

    lines = []
    for metric in METRICS:
      chosen = [r for r in self.rows if r.metric == metric]
      if not chosen:
        continue
      chosen.sort(key=lambda r: r.score if metric != "f1" else -r.score, reverse=True)
      lines.append(f"worst {min(worst, len(chosen))} of {len(chosen)} by {metric}:")
      lines.append(f"  {metric:>6}  {'id':<16}  reference / answer")
      for r in chosen[:worst]:
        lines.append(f"  {r.score:>6.3f}  {cut(r.id)[:16]:<16}  ref: {cut(r.reference)}")
        lines.append(f"  {'':>6}  {'':<16}  hyp: {cut(r.hypothesis)}")
    return "\n".join(lines)
