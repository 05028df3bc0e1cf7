"""textsource: the English readers, their mix, held-out exclusion and word coverage."""

import re

import numpy as np
import pytest

from llasm_jax.data import textsource as ts
from llasm_jax.errors import UserError

NEW = ("quotes", "fortunes", "dialogue", "words")


def variants(text):
  """Spellings of a sentence that `norm` must treat as the same sentence."""
  bare = re.sub(r"[^\w\s']", "", text)
  return [text, text.upper(), bare, "  " + bare.lower().replace(" ", "   ") + " !", text.replace("'", "\u2019")]


@pytest.mark.parametrize("source", sorted(ts.SOURCES))
def test_reader_is_seeded_and_short(source):
  rows = ts.read(source, 60, seed=3)
  assert rows == ts.read(source, 60, seed=3)
  assert ts.read(source, 20, seed=3) == rows[:20]  # a larger n extends a smaller one's list
  assert len(set(rows) & set(ts.read(source, 60, seed=4))) < 30
  assert len({ts.norm(r) for r in rows}) == 60
  for row in rows:
    assert ts.MIN_WORDS <= len(row.split()) <= ts.MAX_WORDS, row
    assert row.isascii() and not re.search(r"\d|http|www", row) and row == " ".join(row.split()), row
    assert max(len(w.strip(",.!?;:'")) for w in row.split()) <= ts.MAX_WORD_CHARS, row
  if source == "words":
    assert all(4 <= len(r.split()) <= 10 for r in rows)


def test_named_readers_match_read():
  for name in NEW:
    assert getattr(ts, name)(5, seed=1) == ts.read(name, 5, seed=1)
  with pytest.raises(UserError, match="expected one of"):
    ts.read("novels", 5)


def test_clean_rows():
  assert ts.clean("A clash of doctrine is not a disaster -- it is an opportunity.") == \
      "A clash of doctrine is not a disaster, it is an opportunity."
  assert ts.clean("\u201cWell\u2026 i\u2019m  fine,\u201d  she said .") == "Well... I'm fine, she said."
  assert ts.clean("Q:\tWhat was the greatest achievement?") == "What was the greatest achievement?"
  assert ts.clean("do you drink") == "Do you drink"
  for bad in ("I have 3 cats.", "See www.example.org today", "Caf\u00e9 au lait is nice.", "Hello.",
              "one two three four five six seven eight nine ten eleven twelve thirteen",
              "This is supercalifragilisticexpialidocious.", "x = f(y) is code", "STOP SHOUTING AT ME",
              "What the fuck is that?"):
    assert ts.clean(bad) is None, bad
  assert ts._split_sentences("Mr. Smith came home. He left!  Did he? Yes.") == \
      ["Mr. Smith came home.", "He left!", "Did he?", "Yes."]
  assert ts.norm("  I'M running LATE, so... start!") == "im running late so start"
  # A fortune's attribution (and what follows it) is not part of the saying.
  assert list(ts._fortune_entries("Be kind.\n\t-- Someone\n\tin a book\n%\nA line\nand more.\n")) == \
      ["Be kind.", "A line and more."]


def test_mix_shares_topup_and_errors():
  mix = {"quotes": .5, "words": .3, "grammar": .2}
  parts = ts.draw(2000, seed=7, mix=mix)
  assert {k: len(v) for k, v in parts.items()} == {"quotes": 1000, "words": 600, "grammar": 400}
  rows = ts.mixed(2000, seed=7, mix=mix)
  assert sorted(rows) == sorted(r for v in parts.values() for r in v) and rows == ts.mixed(2000, seed=7, mix=mix)
  assert len({ts.norm(r) for r in rows}) == 2000 and rows[:50] != [r for v in parts.values() for r in v][:50]
  assert len(set(rows) & set(ts.mixed(2000, seed=8, mix=mix))) < 1000
  # The default mix on 3000 rows: each source's share within a row or two.
  parts = ts.draw(3000, seed=0)
  for name, share in ts.DEFAULT_MIX.items():
    assert abs(len(parts[name]) - 3000 * share) <= 1, name

  # The dialogue corpus holds ~1,400 rows: the rest of its share goes to the other sources.
  dialogue = ts.read("dialogue", 1000, seed=0)
  n_dialogue = len(dialogue) + len(ts._take(ts.SOURCES["dialogue"](0), 10**6, set(map(ts.norm, dialogue))))
  parts = ts.draw(3000, seed=0, mix={"dialogue": .9, "words": .1})
  assert len(parts["dialogue"]) == n_dialogue < 2700 and len(parts["words"]) == 3000 - n_dialogue
  with pytest.raises(UserError, match="gives only"):
    ts.mixed(n_dialogue + 1, mix={"dialogue": 1.0})
  with pytest.raises(UserError, match="has only"):
    ts.read("dialogue", n_dialogue + 1)
  with pytest.raises(UserError, match="unknown source 'novels'"):
    ts.mixed(10, mix={"novels": 1.0})
  with pytest.raises(UserError, match="no source"):
    ts.mixed(10, mix={"words": 0})


def test_held_out_is_never_yielded(monkeypatch):
  # A held-out list drawn from the sources themselves, with the same seed: without `exclude` each
  # source's first rows would be these.
  held = [r for name in ts.SOURCES for r in ts.read(name, 15, seed=5)]
  exclude = [v for r in held for v in variants(r)]
  keys = {ts.norm(r) for r in held} | {ts.norm(r) for r in ts.EVERYDAY}
  for name in ts.SOURCES:
    assert set(ts.read(name, 30, seed=5)) & set(held)  # the test can fail
    assert not {ts.norm(r) for r in ts.read(name, 300, seed=5, exclude=exclude)} & keys, name
  rows = ts.mixed(4000, seed=5, exclude=exclude)
  assert not {ts.norm(r) for r in rows} & keys
  # Every corpus row at all: no EVERYDAY sentence, in any spelling.
  for name in ("quotes", "fortunes", "dialogue"):
    assert not {ts.norm(r) for r in ts._take(ts.SOURCES[name](0), 10**6, set())} & ts.HELD_OUT

  # A source that holds EVERYDAY sentences (spelled otherwise) never yields them.
  fake = tuple(v for t in ts.EVERYDAY[:5] for v in variants(t)) + ("Hello there, friend.",)
  monkeypatch.setitem(ts.SOURCES, "fake", ts._shuffled(lambda: fake))
  assert ts.read("fake", 1, seed=0) == ["Hello there, friend."]
  with pytest.raises(UserError, match="has only 1 distinct rows"):
    ts.read("fake", 2)


def test_missing_package_names_the_install():
  with pytest.raises(UserError, match=r"pip install nothere-pkg==0\.1"):
    ts._need("nothere_pkg", "nothere-pkg==0.1", "quotes")


def test_coverage_hand_made():
  held = ["The cat's hat.", "A cat sat!", "the the"]
  c = ts.coverage(held, ["the CAT, sat", "dogs"])
  # types: the, cat's, hat, a, cat, sat (3 found); tokens: 8, of which the x3, cat, sat found.
  assert c == {"types": 6, "tokens": 8, "type_share": 0.5, "token_share": 5 / 8, "missing": ["a", "cat's", "hat"]}
  assert ts.words_of("Don't 'quote' me \u2014 OK?") == ["don't", "quote", "me", "ok"]
  assert ts.coverage_line(held, ["the cat sat"], name="h.txt", show=2) == (
      "held-out coverage: 50.0% of 6 word types (62.5% of tokens) of h.txt appear in the text; "
      "missing: a, cat's, ... (1 more)")
  assert ts.coverage([], ["x"])["type_share"] == 1.0


def test_everyday_coverage():
  """The issue's numbers: the grammar and questions hold ~40% of EVERYDAY's word types, the mix ~97%+."""
  grammar = ts.coverage(ts.EVERYDAY, ts.sentences(2000) + ts.questions(500))
  assert 0.35 < grammar["type_share"] < 0.45 and 0.5 < grammar["token_share"] < 0.62
  mix = ts.coverage(ts.EVERYDAY, ts.mixed(20000, seed=0))
  assert mix["type_share"] > 0.95 and mix["token_share"] > 0.96
  # An independent count of the same types: lowercased words with outer punctuation stripped.
  types = {w.strip(".,!?").lower() for t in ts.EVERYDAY for w in t.split()}
  assert grammar["types"] == len(types)


class SilentEngine:
  """A stand-in TTS: a short quiet tone per text, fast."""

  def synthesize(self, text, language, rng):
    return (0.1 * np.sin(np.arange(1600) / 5.0)).astype(np.float32)


def test_cli_prints_held_out_coverage(tmp_path, capsys):
  from llasm_jax import cli

  text = tmp_path / "train.txt"
  text.write_text("The cat sat on the mat.\nA dog ran home.\n", encoding="utf-8")
  held = tmp_path / "held_out.txt"
  held.write_text("The dog sat.\n\nA bird flew home!\n", encoding="utf-8")
  args = ["data", "synth", "--text", str(text), "--out", str(tmp_path / "out"), "--workers", "0",
          "--engine", "tests.data.test_textsource:SilentEngine", "--format", "wav"]
  assert cli.main(args + ["--held-out", str(held)]) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  assert "made 2" in printed[0]
  assert printed[-1] == ("held-out coverage: 71.4% of 7 word types (71.4% of tokens) of held_out.txt appear in "
                         "the text; missing: bird, flew")
  assert cli.main(args + ["--held-out", str(tmp_path / "nope.txt")]) == 2
  assert "--held-out" in capsys.readouterr().err
