"""`llasm-jax eval`: greedy answers over a built dataset, scored against its references (WER / CER / answer F1).

Rows are the dataset's first `limit` rows, in order. What is asked and how it is scored:
- ASR rows. A LLaSM hears the stage-1 prompt of training with the choices pinned: the first
  instruction of the row's language (`templates.TRANSCRIBE_EN[0]` / `TRANSCRIBE_ZH[0]`) after the
  audio, the order of the LLaSM demo and one of the two training placements. A Whisper folder
  transcribes the audio instead (`transcribe.Transcriber`): the baseline LLaSM is compared with.
  Transcripts are scored over the whole corpus: WER, or CER for languages written without word
  spaces (`scoring.py`).
- Instruction rows. The conversation up to its last assistant turn is the prompt (earlier
  replies are the references: teacher forcing), that turn is the reference. Scored by SQuAD's
  token F1, averaged over rows (`scoring.py`).
Prompts come from the training pipeline itself (`pipeline.Featurize`, the same template and
audio windows), cut before the reference's labelled tokens: the prompt is what training saw
minus the answer. Datasets of cached Whisper outputs (`llasm-jax data encode`) give
`AudioFeatures` slots, after the cache is checked against the model's own Whisper.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any, Callable, Sequence

import numpy as np

from llasm_jax import checkpoint, tokens
from llasm_jax.data import pipeline, sources
from llasm_jax.data.cache import check_cache, resolve_features
from llasm_jax.data.features import MAX_FRAMES
from llasm_jax.infer.audio_embed import AudioFeatures
from llasm_jax.infer.mesh import bucket
from llasm_jax.infer.scoring import EvalRow, Report, score
from llasm_jax.errors import UserError


# ---------------------------------------------------------------------------------------------
# Rows and answers


def _str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_rows(source, limit: int | None = None) -> list[EvalRow]:
  """The first `limit` rows of `source` (a `pipeline.Source`), with their references."""
  n = len(source) if not limit or limit < 0 else min(int(limit), len(source))
  rows = []
  for i in range(n):
    record = source[i]
    kind = sources.record_kind(record, source.kind)
    if kind == "asr":
      reference = _str(record["text"])
    else:
      roles = [int(r) for r in record["roles"]]
      if not roles or roles[-1] != 1:
        raise UserError(f"{source}: row {i} does not end with an assistant turn, so it has no reference answer")
      reference = _str(record["values"][-1])
    rows.append(EvalRow(index=i, id=_str(record.get("id", str(i))), kind=kind,
                        language=_str(record.get("language", "")), reference=reference, record=record))
  return rows


class _FirstChoices:
  """Stands in for a sample's rng in `pipeline.Featurize`, pinning the stage-1 prompt: the first
  instruction of the pool (`integers` -> 0) and the audio before it (`random` -> 0.5, the
  "audio first" side of `templates.asr_messages`)."""

  def integers(self, low, high=None, *args, **kw):
    return 0 if high is None else low

  def random(self, *args, **kw):
    return 0.5


def prompt_end(labels: np.ndarray) -> int:
  """Where the last labelled run (the reference answer and its end token) starts: the prompt ends there."""
  target = np.flatnonzero(labels != tokens.IGNORE)
  if not len(target):
    raise UserError("the row has no answer tokens (labels); nothing to compare against")
  gaps = np.flatnonzero(np.diff(target) > 1)
  return int(target[gaps[-1] + 1] if len(gaps) else target[0])


class LlasmAnswers:
  """Greedy replies of a LLaSM `Generator` to rows, prompted as training prompted them."""

  def __init__(self, generator, kind: str, pcfg: pipeline.PipelineConfig, max_new_tokens: int = 128):
    if generator.tokenizer is None:
      raise UserError(f"{generator.folder or 'the model'} has no tokenizer; eval needs one to build prompts")
    self.generator, self.max_new_tokens = generator, max_new_tokens
    self.pcfg = pcfg
    self.featurize = pipeline.Featurize(pcfg, generator.tokenizer, kind)
    self.timings = collections.Counter()

  @classmethod
  def for_source(cls, generator, source, *, template: str | None = None, system: str | None = None,
                 mel_frames: int | None = None, max_new_tokens: int = 128,
                 check_whisper: bool = True) -> "LlasmAnswers":
    """Prompts for `source`'s rows: its raw audio, or its cached features after checking they are
    what this model's Whisper computes (mode, sizes, windows and, with `check_whisper`, weights).
    `template` / `system`: the prompt format training used; None = the generator's
    (`Generator.prompt_format`: its folder's record, else its tokenizer's chat template, ...)."""
    cfg = generator.cfg
    if cfg is None:
      raise UserError("a text-only LLM cannot hear the dataset's audio; evaluate a LLaSM folder (or a Whisper one)")
    features = resolve_features("auto", source)
    if mel_frames is None:
      mel_frames = source.cache["mel_frames"] if features == "cached" else MAX_FRAMES
    if features == "cached":
      fingerprint = None
      if check_whisper:
        from flax import nnx

        from llasm_jax.data.encode import speech_fingerprint

        fingerprint = speech_fingerprint(nnx.to_pure_dict(nnx.state(generator.engine.model)))
      check_cache(source.cache, cfg, mel_frames=mel_frames, whisper_fingerprint=fingerprint,
                  where=f"--data {','.join(source.paths)!r}")
    # No cuts: the whole conversation and every audio slot (long audio takes several windows).
    template, system = generator.prompt_format(template, system)
    pcfg = pipeline.PipelineConfig.from_model(cfg, seq_len=1 << 30, max_audios=1 << 16, mel_frames=mel_frames,
                                              template=template, system=system, features=features)
    return cls(generator, source.kind, pcfg, max_new_tokens)

  def prompt(self, record: dict[str, Any]) -> tuple[list[int], list[np.ndarray | AudioFeatures]]:
    """A row's prompt ids and its audio slots (log-mel float32[M, F_j] or cached features)."""
    sample = self.featurize(record, _FirstChoices())
    ids = sample["input_ids"][:prompt_end(sample["labels"])].tolist()
    if "audio_features" in sample:
      bounds = np.cumsum([0] + sample["audio_feature_lengths"].tolist())
      frames = record["mel_lengths"]
      audio = [AudioFeatures(np.asarray(sample["audio_features"][a:b]), int(frames[j]))
               for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    else:
      audio = [m[:, :int(n)] for m, n in zip(sample["mel"], sample["mel_lengths"])]
    return ids, audio

  def __call__(self, rows: Sequence[EvalRow]) -> list[str]:
    t0 = time.perf_counter()
    prompts, audios = zip(*(self.prompt(r.record) for r in rows))
    self.timings["features_s"] += time.perf_counter() - t0
    outs, timings = self.generator.engine.generate(list(prompts), list(audios) if any(audios) else None,
                                                   max_new_tokens=self.max_new_tokens)
    for k in ("audio_s", "prefill_s", "decode_s", "generated_tokens"):
      self.timings[k] += getattr(timings, k)
    return [self.generator.decode(o.token_ids).strip() for o in outs]


class CtcAnswers(LlasmAnswers):
  """Greedy CTC transcripts of a LLaSM model's adaptor alone, no LLM pass (`Llasm.ctc_greedy`): the
  LLM tokens its audio embeddings spell against the LLM's embedding table. For a model trained with
  a CTC loss: set beside `LlasmAnswers`, it tells what the adaptor hears from what the LLM reads."""

  def __init__(self, generator, kind: str, pcfg: pipeline.PipelineConfig, max_new_tokens: int = 128):
    super().__init__(generator, kind, pcfg, max_new_tokens)
    if not generator.cfg.ctc:
      raise UserError(f"{generator.folder or 'the model'} has no CTC blank (it was not trained with a CTC "
                       "loss): its adaptor alone spells nothing; evaluate it through the LLM instead")
    import jax
    from flax import nnx

    graphdef, self._state = nnx.split(generator.engine.model)

    @functools.partial(jax.jit, static_argnames="cached")
    def spell(state, audio, lengths, cached: bool):
      model = nnx.merge(graphdef, state)
      if cached:  # Whisper's outputs float[N, S, E]
        embeds, valid = model.adapt(audio[:, None], lengths[:, None], raw=True)
      else:  # log-mel float[N, M, F]
        embeds, valid = model.embed_audio(audio[:, None], lengths[:, None], raw=True)
      _, best, keep = model.ctc_greedy(embeds[:, 0], valid[:, 0])
      return best, keep

    self._spell = spell

  def __call__(self, rows: Sequence[EvalRow]) -> list[str]:
    t0 = time.perf_counter()
    audios = [self.prompt(r.record)[1][0] for r in rows]  # an ASR row's one audio slot
    cached = isinstance(audios[0], AudioFeatures)
    arrays = [a.features if cached else a.T for a in audios]  # frames first: float[S, E] / [F, M]
    lengths = np.array([len(a) for a in arrays], np.int32)
    # Cached outputs padded to the engine's length buckets (few shapes to compile); log-mel to the
    # window Whisper reads.
    longest = bucket(int(lengths.max())) if cached else self.pcfg.mel_frames
    batch = np.zeros((len(arrays), longest, arrays[0].shape[1]), np.float32)
    for i, a in enumerate(arrays):
      batch[i, :len(a)] = a
    if not cached:
      batch = batch.transpose(0, 2, 1)  # back to log-mel float[N, M, F]
    best, keep = (np.asarray(x) for x in self._spell(self._state, batch, lengths, cached))
    self.timings["ctc_s"] += time.perf_counter() - t0
    return [self.generator.decode(b[k].tolist()).strip() for b, k in zip(best, keep)]


class WhisperAnswers:
  """Greedy transcripts of a `Transcriber` (Whisper alone), in each row's language when the model knows it."""

  def __init__(self, transcriber, max_new_tokens: int | None = None, batch_size: int = 16):
    self.transcriber, self.max_new_tokens, self.batch_size = transcriber, max_new_tokens, batch_size
    self.timings = collections.Counter()

  def __call__(self, rows: Sequence[EvalRow]) -> list[str]:
    tr = self.transcriber
    audios = [sources.record_audios(r.record, "asr")[0] for r in rows]
    known = tr.tokens.languages
    languages = [r.language if f"<|{r.language.lower()}|>" in known else None for r in rows]
    limit = tr.tokens.max_length - len(tr.tokens.prompt(None))
    texts = tr.transcribe(audios, languages, batch_size=self.batch_size,
                          max_new_tokens=None if self.max_new_tokens is None else min(self.max_new_tokens, limit))
    for k, v in tr.timings.as_dict().items():
      self.timings[k] += v
    return texts


def run(rows: Sequence[EvalRow], answer: Callable[[Sequence[EvalRow]], list[str]], *, batch: int = 8,
        info: dict[str, Any] | None = None) -> Report:
  """Answers the rows `batch` at a time, scores them and reports."""
  if batch < 1:
    raise UserError(f"--batch {batch}: expected >= 1")
  t0 = time.perf_counter()
  for s in range(0, len(rows), batch):
    chunk = rows[s:s + batch]
    texts = answer(chunk)
    if len(texts) != len(chunk):
      raise UserError(f"{len(texts)} answers for {len(chunk)} rows")
    for row, text in zip(chunk, texts):
      row.hypothesis = text
  totals = score(rows)
  timings = {k: float(v) for k, v in getattr(answer, "timings", {}).items()}
  timings["total_s"] = time.perf_counter() - t0
  return Report(list(rows), totals, timings, dict(info or {}))


def evaluate(ckpt: str, data: str, *, limit: int | None = None, batch: int = 8, max_new_tokens: int = 128,
             mesh=None, rules=None, template: str | None = None, system: str | None = None,
             mel_frames: int | None = None, answer: Callable[[Sequence[EvalRow]], list[str]] | None = None,
             **run_options) -> Report:
  """Evaluates the model folder `ckpt` on the built dataset `data` (see the module docstring).
  `template` / `system`: the prompt format training used (None: the folder's record, else its
  tokenizer's chat template with its own system prompt, else llasm-cllama2 with LLaSM's).
  `answer` replaces the model (rows -> texts), e.g. to check the scoring alone."""
  source = pipeline.Source(data)
  rows = read_rows(source, limit)
  if not rows:
    raise UserError(f"--data {data!r} holds no rows")
  info = {"ckpt": ckpt, "data": data, "dataset_kind": source.kind, "limit": limit, "max_new_tokens": max_new_tokens}
  if answer is None:
    answer, info["model_kind"] = load_answers(ckpt, source, batch=batch, max_new_tokens=max_new_tokens, mesh=mesh,
                                              rules=rules, template=template, system=system, mel_frames=mel_frames,
                                              **run_options)
  return run(rows, answer, batch=batch, info=info)


def load_answers(ckpt: str, source, *, batch: int, max_new_tokens: int, mesh=None, rules=None,
                 template: str | None = None, system: str | None = None, mel_frames: int | None = None,
                 **run_options):
  """The answering model of the folder `ckpt` for `source`'s rows, and the folder's kind."""
  kind = checkpoint.read_meta(ckpt)["kind"]
  where = f"--data {','.join(source.paths)!r}"
  if kind == "whisper":
    if source.kind != "asr":
      raise UserError(f"--ckpt {ckpt!r} is a Whisper, which transcribes, but {where} holds {source.kind} "
                       "conversations; give an 'asr' dataset, or a LLaSM folder")
    if source.cache is not None:
      raise UserError(f"{where} holds cached Whisper features, no audio to transcribe; evaluate the Whisper on "
                       "the raw dataset it was encoded from")
    from llasm_jax.infer.transcribe import Transcriber

    return WhisperAnswers(Transcriber.load(ckpt, mesh=mesh, rules=rules, **run_options), max_new_tokens, batch), kind
  if kind != "llasm":
    raise UserError(f"--ckpt {ckpt!r} is a text-only LLM ({kind!r}), which cannot hear {where}'s audio; "
                     "evaluate a LLaSM folder (or a Whisper folder on an 'asr' dataset)")
  from llasm_jax.infer.generator import Generator

  generator = Generator.load(ckpt, mesh=mesh, rules=rules, template=template, system=system, **run_options)
  return LlasmAnswers.for_source(generator, source, template=template, system=system, mel_frames=mel_frames,
                                 max_new_tokens=max_new_tokens), kind

