"""What every phase of the demo shares: its options, the names of its models and sets, the log, and the
record of finished phases (WORKDIR/phases.json)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

from tqdm import tqdm

WHISPER_REPO = "openai/whisper-tiny.en"
LLM_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEMPLATE = "chat-template"
SYSTEM = ""  # the chat template's own system prompt (SmolLM2's), as the typed answers were made
VOICES = ("espeak", "piper")
# Held-out evaluation sets, each spoken by every voice: name -> what it measures.
HELD_OUT = {"asr_held": "grammar sentences never trained on", "everyday": "hand-written everyday sentences",
            "questions_held": "spoken questions never trained on"}
RECORDED = "recorded"  # people reading (LibriVox), held out: no generator of ours made them


def _opt(default, help: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class Options:
  """The demo's options; `llasm-jax demo` makes one flag of each field (`--ctc-share`, ...)."""

  workdir: str = _opt(os.path.join("workdir", "demo"), "everything the demo makes; run again to resume")
  whisper: str | None = _opt(None, "Whisper folder (HF or CTranslate2; default: the HF cache's "
                                   "openai/whisper-tiny.en, else the installed tiny.en wheel)")
  llm: str | None = _opt(None, "LLM folder or GGUF file (default: the HF cache's SmolLM2-135M-Instruct, "
                               "else the installed GGUF wheel)")
  minutes: float = _opt(8.0, "training time budget in minutes, both phases, start-up included (the other "
                             "phases take about 11 more on 2 cores)")
  ctc_share: float = _opt(0.35, "share of the budget for the CTC warm phase (0: none)")
  sentences: int = _opt(800, "spoken training sentences (ASR), drawn from the text mix (the encoder mode's "
                             "adaptor, which learns the speech side, wants 4000)")
  mix: str = _opt("", "text mix, 'source=share,...' over quotes, fortunes, dialogue, words, grammar "
                      "(default: textsource.DEFAULT_MIX)")
  piper_share: float = _opt(0.25, "share of the training utterances spoken by Piper (the rest: espeak-ng)")
  augment_share: float = _opt(0.3, "share of the training utterances given reverb and noise")
  held_out: int = _opt(40, "held-out grammar sentences")
  questions: int = _opt(160, "spoken training questions")
  held_out_questions: int = _opt(16, "held-out spoken questions")
  mode: str = _opt("decoder", "encoder: Whisper encoder + projector; decoder: Whisper's decoder states along its "
                              "own transcript + projector (no CTC phase); llasm: LLaSM's decoder queries",
                   choices=("encoder", "decoder", "llasm"))
  adaptor: str = _opt("ultravox", "encoder-mode projector", choices=("ultravox", "mlp"))
  stack_factor: int = _opt(8, "encoder frames per audio token (8: 6.25 tokens per second)")
  adaptor_hidden: int = _opt(2048, "the encoder- or decoder-mode adaptor's inner width")
  audio_tokens: int = _opt(40, "decoder mode: Whisper transcript tokens per audio the LLM reads (<|endoftext|> "
                               "included; the demo's sentences take at most about 30, and fewer make shorter rows)")
  batch: int = _opt(8, "rows per step of the CE phase")
  ctc_batch: int = _opt(64, "rows per step of the CTC warm phase")
  ctc_negatives: int = _opt(4096, "CTC classes besides the batch's transcript tokens (0: the whole vocab)")
  lr: float = _opt(2e-3, "learning rate of the CE phase (the adaptor and the LoRA factors)")
  ctc_lr: float = _opt(3e-3, "adaptor learning rate of the CTC warm phase")
  loss: str = _opt("ce", "ce: the targets' cross-entropy; kd: KL to the LLM reading the text; mix: both",
                   choices=("ce", "kd", "mix"))
  ctc_weight: float = _opt(0.3, "weight of the auxiliary CTC loss in the CE phase (0: none)")
  soft_tokens: bool = _opt(False, "after the warm phase the LLM reads the adaptor's CTC hypothesis as soft text "
                                  "(LegoSLM) instead of its outputs")
  lora_rank: int = _opt(8, "LoRA rank on the LLM's query and value projections in the CE phase (0: the LLM "
                           "stays frozen): the LLM learns to read the adaptor's outputs while they learn to speak")
  answer_tokens: int = _opt(48, "the LLM's typed answers are cut here (and so are the spoken ones at eval)")
  seed: int = _opt(0, "seed of the texts, voices and training")
  workers: int = _opt(min(2, os.cpu_count() or 1), "synth / build processes")


def log(msg: str) -> None:
  tqdm.write(msg)


# ---------------------------------------------------------------------------------------------
# Phases: run once, recorded with their wall time.


class Phases:
  """WORKDIR/phases.json: each finished phase's result and seconds; a rerun returns the stored result."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "phases.json")
    self.done: dict[str, dict[str, Any]] = {}
    if os.path.isfile(self.path):
      with open(self.path) as f:
        self.done = json.load(f)

  def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if name in self.done:
      log(f"[{name}] done in an earlier run ({self.done[name]['seconds']:.0f} s), kept")
      return self.done[name]["result"]
    log(f"[{name}]")
    t0 = time.perf_counter()
    result = fn()
    self.done[name] = {"seconds": round(time.perf_counter() - t0, 1), "result": result}
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.done, f, indent=1, ensure_ascii=False)
    os.replace(tmp, self.path)
    log(f"[{name}] {self.done[name]['seconds']:.1f} s")
    return result

  def seconds(self) -> dict[str, float]:
    return {k: v["seconds"] for k, v in self.done.items()}
