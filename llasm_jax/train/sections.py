"""The default `train`, `optim`, `data` and `eval` sections of a training run config."""

from __future__ import annotations

import ml_collections

from llasm_jax.errors import UserError
from llasm_jax.sharding import DEFAULT_RULES


STAGES = {"stage1": 1, "stage2": 2}  # a run config file's argument -> the LLaSM stage it trains


def stage_of(arg: str) -> int:
  """A run config file's argument ("stage1" or "stage2", as in `configs/tiny.py:stage2`) -> its LLaSM stage."""
  if arg not in STAGES:
    raise UserError(f"config argument {arg!r}: expected {' or '.join(STAGES)}, as in --config configs/tiny.py:stage2")
  return STAGES[arg]


def training_sections(stage: int) -> dict[str, ml_collections.ConfigDict]:
  """Default `train`, `optim`, `data` and `eval` sections of a training config for LLaSM stage 1 or 2.

  Stage 1 (modality adaptation): Whisper and the LLM frozen, only the adaptor trains.
  Stage 2 (instruction tuning): the adaptor and the LLM train; Whisper stays frozen.
  """
  if stage not in (1, 2):
    raise UserError(f"stage {stage}: LLaSM has stages 1 and 2")
  # What trains, for how long, checkpoints and the loss (llasm_jax/train/trainer.py).
  train = ml_collections.ConfigDict(dict(
      stage=stage,  # for the record (WORKDIR/config.json): `trainable` and optim.lr make the stages differ
      # Regexes over parameter paths ("adaptor/...", "llm/model/layers/...", "audio/..."); the rest is frozen.
      trainable=("adaptor/.*",) if stage == 1 else ("adaptor/.*", "llm/.*"),
      new_token_rows_only=False,  # with "llm/.*embed_tokens.*" trainable: only the audio-token rows
      # LoRA (llasm_jax/layers/lora.py): W x + (alpha / rank) B A x on the LLM projections that `targets`
      # match. With rank > 0 its factors are the only LLM parameters that train, whatever `trainable`
      # says of "llm/..." (the adaptor still trains per `trainable`), and the only ones with optimizer
      # state; the model folder stores them beside the frozen weights (export: --merge-lora, or a PEFT
      # adapter).
      lora=ml_collections.ConfigDict(dict(
          rank=0,  # rank: the inner width r of A float[in, r] and B float[r, out], 0 = no LoRA;
          alpha=16.0,  # alpha: the update's scale is alpha / rank (PEFT's lora_alpha);
          dropout=0.0,  # dropout: on the input of A, in training steps only (PEFT's lora_dropout);
          targets=("llm/.*(q_proj|v_proj)",),  # targets: regexes over projection kernel paths; "llm/.*_proj": all 7
      )),
      init_from="",  # a model folder (llasm-jax convert) or a stage-1 workdir's model/ folder
      steps=1000,  # optimizer steps in all (a resumed run goes on to it); also the length of the LR schedule
      batch_size=32,  # global, over all processes
      grad_accum=1,  # micro-batches per step, their gradients summed; batch_size divides by it x data x fsdp
      seed=0,  # the random initial parameters (without init_from) and the step's rng
      log_every=10,  # steps per log line and TensorBoard point (device values are read only then)
      checkpoint_every=500,  # steps between checkpoints in WORKDIR/checkpoints (one more at the end)
      keep_checkpoints=3,  # the latest checkpoints kept
      # The run stops when more steps than this had a non-finite loss or gradients (their updates
      # are skipped), counted over the run and checked every log_every steps.
      max_nonfinite_steps=20,
      peak_tflops_per_device=0.0,  # for MFU; 0 = not reported (e.g. 197 for TPU v5e bf16, 989 for H100)
      # A time budget in minutes of training (compiles and evals not counted); when it runs out the
      # run saves and ends as if finished (its model folder is written). 0 = none: `steps` decide.
      max_minutes=0.0,
      debug_sigterm_at_step=0,  # tests: the run sends itself SIGTERM after this step (preemption); 0 = never
      # JAX's persistent compilation cache, so that a resumed or repeated run does not compile
      # again: "" = WORKDIR/compilation_cache, "none" = off, or any folder (gs:// too) that
      # several runs share.
      compilation_cache="",
      # "ce", "kd", "mix" or "ctc" (see LOSSES). The teacher of "kd"/"mix" is the frozen LLM reading each
      # audio's transcript as text, so the LLM must stay frozen (stage 1) and the data must carry
      # transcripts (ASR datasets; instruction datasets built with their spoken turns' text). "ctc":
      # the adaptor alone, its outputs scored against the LLM's embedding table plus a learned blank
      # and aligned to the transcripts (no LLM pass: a cheap warm-up before "ce"); not with packing.
      loss="ce",
      kd_weight=0.5,  # "mix": loss = (1 - kd_weight) * CE + kd_weight * KL
      kd_temperature=1.0,  # softmax temperature of both distributions (the KL is scaled by its square)
      # "ce" / "kd" / "mix": loss += ctc_weight * the CTC mean per transcript token (0 = none); a
      # model without the CTC blank gets a fresh one (ctc_blank/..., trained beside the adaptor).
      ctc_weight=0.0,
      # CTC classes: 0 = the whole vocab; N = a sampled softmax over the batch's transcript tokens and N
      # random others (the [B, P, V] logits of a large vocab cost as much as the LLM pass "ctc" skips).
      ctc_negatives=0,
      # Target positions per row whose LM head and loss run at once (teacher's too), recomputed in the
      # backward pass: the float32[B, K, V] logits never exist whole (llasm_jax/train/losses.py). 0 = all at once.
      loss_chunk=0,
  ))
  # AdamW on the trainable parameters, linear warmup then cosine decay (llasm_jax/train/optim.py).
  optim = ml_collections.ConfigDict(dict(
      lr=1e-3 if stage == 1 else 2e-5,  # the peak learning rate, reached after warmup
      warmup_steps=100,  # linear warmup from 0 (at most train.steps - 1)
      end_lr_ratio=0.1,  # the cosine decay ends at lr * end_lr_ratio at train.steps
      b1=0.9,  # AdamW beta1
      b2=0.999,  # AdamW beta2
      eps=1e-8,  # AdamW epsilon
      weight_decay=0.0,  # AdamW decoupled weight decay, on matrices only (not norms, biases, scales)
      clip_norm=1.0,  # the trainable gradients' global norm is clipped to this before AdamW
      # Non-finite updates in a row that are skipped before one is applied anyway
      # (optax.apply_if_finite); the default never applies one: train.max_nonfinite_steps stops first.
      max_consecutive_nonfinite=1_000_000,
  ))
  # The training batches (contract: llasm_jax/data/contract.py; "synthetic": llasm_jax/train/synthetic.py).
  data = ml_collections.ConfigDict(dict(
      source="synthetic",  # or "tfds": the datasets of `llasm-jax data build`
      dir="",  # "tfds": comma-separated folders written by `llasm-jax data build`
      tokenizer="",  # "tfds": tokenizer folder; default: config.train.init_from (a model folder)
      # "tfds": llasm-cllama2 | llasm-baichuan | chat-template; recorded in the model folder, whose
      # generate / chat / eval then default to it.
      template="llasm-cllama2",
      # The system prompt, in training and in config.eval (recorded with the template): None = the
      # template's default, LLaSM's (templates.LLASM_SYSTEM) for llasm-cllama2 / llasm-baichuan and
      # the chat template's own (e.g. SmolLM2's) for chat-template; "" = none; or any text.
      system=None,
      # "tfds": the template's fixed opening (system block, start of the first user turn) is sent
      # once per batch and run once, its keys and values shared by every row (exact; stage 1 with
      # LLaSM's long system prompt skips about half of each row's tokens).
      shared_prefix=False,
      workers=0,  # "tfds": grain worker processes; 0 = min(8, CPUs); -1 = none, read in this process
      threads=2,  # "tfds": grain reader threads in each worker
      seq_len=512,  # T: tokens per row (the longest bucket); a longer sample is cut, with the audio past the cut
      max_audios=1,  # A: audio slots per row; audio beyond them is cut together with the text from its marker on
      # "encoder" mode: F, the audio window in mel frames (at most 3000 = 30 s; a longer audio takes
      # one slot per window). "llasm" mode always reads 3000.
      mel_frames=3000,
      buckets=(),  # "tfds": allowed sequence lengths T, ascending, ending at seq_len; () = always seq_len
      # "tfds": "mel" (raw audio), "cached" (a `llasm-jax data encode` dataset: no Whisper in the
      # step), or "auto": what config.data.dir holds.
      features="auto",
      feature_buckets=(),  # "cached", encoder mode: allowed feature frame counts S; () = quarters of a window
      # "tfds": several samples per row (less padding when lengths vary, as in stage 2), each attending
      # only to itself, its positions restarting; the loss of every target token is unchanged. max_audios
      # is then the audio slots of a whole row, shared by its samples: a sample joins a row only if its
      # tokens fit in seq_len and its slots in max_audios, so raise max_audios to about the samples a
      # row holds times their audios (e.g. 8 for 2048-token rows of ~300-token one-audio samples).
      # Not with a distilling loss (kd, mix).
      packing=False,
      # packing: samples packed together, longest first into the first row they fit (first-fit decreasing);
      # larger fills rows better (128: ~98% for 300-token samples in 2048-token rows), and a worker holds
      # them all at once (their mel too).
      pack_window=128,
      num_examples=10_000,  # "synthetic" only
      seed=0,  # the shuffle and each sample's random choices (such as the stage-1 instruction)
  ))
  # Greedy answers of the current parameters on a held-out dataset, scored (eval/wer, eval/cer,
  # eval/f1 in TensorBoard and the step log) every `every` steps and at the end; 0 = off.
  evaluation = ml_collections.ConfigDict(dict(
      every=0,  # training steps between evals (one more at the end); 0 = no eval
      data="",  # a dataset of `llasm-jax data build` (or `data encode`), asr or instructions
      limit=64,  # its first rows
      max_new_tokens=64,  # the longest greedy answer, in tokens
      batch=8,  # rows per generate call (a multiple of the data x fsdp devices wastes nothing)
  ))
  return dict(train=train, optim=optim, data=data, eval=evaluation)


def from_model_folder(stage: int, init_from: str) -> ml_collections.ConfigDict:
  """A run config that trains the model folder `init_from` (whose architecture it takes) in LLaSM
  stage 1 or 2, data-parallel over all devices, with the default sections to fill in."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"preset": "tiny"})  # unused: init_from's architecture wins
  config.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(stage))
  config.train.init_from = init_from
  return config


def pod_config(preset: str, stage: int, **llm) -> ml_collections.ConfigDict:
  """A ~7B LLaSM's run config on a TPU pod or GPU cluster in `stage` 1 (the adaptor trains) or 2 (and the
  LLM): bfloat16 matmuls over float32 master weights, FSDP over every device; `llm` adds LLM fields."""
  config = ml_collections.ConfigDict()
  # Stage 2 recomputes each whole LLM layer in the backward pass, stage 1 keeps its matmul outputs.
  config.model = ml_collections.ConfigDict({
      "preset": preset,
      "llm": {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "dots_no_batch" if stage == 1 else "full",
              **llm},
      "audio": {"dtype": "bfloat16", "param_dtype": "float32"},
  })
  # ~7B float32 master weights plus Adam moments need sharding.
  config.mesh = ml_collections.ConfigDict({"shape": {"data": 1, "fsdp": -1, "tensor": 1}})
  config.logical_axis_rules = DEFAULT_RULES
  config.update(training_sections(stage))
  config.train.steps = 20000 if stage == 1 else 30000
  config.train.batch_size = 256 if stage == 1 else 128
  config.data.seq_len = 256 if stage == 1 else 2048
  return config


def pod_encoder_config(preset: str, arg: str) -> ml_collections.ConfigDict:
  """`pod_config` of an ~8B "encoder"-mode LLaSM (Whisper large-v3 + an Instruct LLM with its own chat
  template); `arg` "stage1" or "stage2". The vocab is padded to a multiple of 128 so a tensor axis splits it."""
  stage = stage_of(arg)
  config = pod_config(preset, stage, vocab_multiple=128)
  if stage == 2:
    # The LM head and cross-entropy 256 positions at a time: float32[B, T, V] logits are never whole.
    config.train.loss_chunk = 256
  config.data.template = "chat-template"  # the Instruct tokenizer's own
  # Stage 1: an audio of 30 s is 188 audio tokens (1500 frames / 8), plus the prompt and transcript.
  if stage == 1:
    config.data.seq_len = 512
  return config
