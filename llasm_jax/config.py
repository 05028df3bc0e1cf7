"""Run configs (ml_collections files in configs/) -> the frozen model dataclasses, and shared defaults.

A run config holds `model` (a preset of `LLASM_PRESETS` plus overrides), `mesh` and
`logical_axis_rules`. The model section reads:

  model.preset = "llasm_cllama2"          # a key of LLASM_PRESETS
  model.audio = {"dtype": "bfloat16"}     # WhisperConfig fields to override
  model.llm = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
  model.mode = "encoder"                  # any other LlasmConfig field, at the top level
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any, Mapping

import ml_collections

from llasm_jax.models.llama import LlamaConfig, RopeScaling
from llasm_jax.models.llasm import LLASM_PRESETS, LlasmConfig
from llasm_jax.models.whisper import WhisperConfig
from llasm_jax.errors import UserError

# Logical axis -> mesh axis (or axes, or None = replicated), for the ("data", "fsdp", "tensor")
# mesh. Weights: their width ("embed") over "fsdp", heads/MLP/vocab over "tensor". Activations
# ("act_*", "batch", ...): the batch over "data" and "fsdp" together (FSDP is data parallelism
# whose weights are gathered per layer), the width whole, heads/MLP/vocab over "tensor".
# Vocab sizes such as 32003 (LLaSM-Cllama2) and 51865 (Whisper) do not divide by a tensor axis
# > 1: keep tensor=1 for those models or map "vocab" and "act_vocab" to None.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Weights:
    ("embed", "fsdp"),  # the model width (LLM hidden_size, Whisper d_model), norms and biases too
    ("heads", "tensor"),  # attention heads x head dim (LLM queries and o_proj; all of Whisper's q, k, v)
    ("kv_heads", "tensor"),  # LLM key/value heads x head dim
    ("mlp", "tensor"),  # MLP hidden width (and the "encoder"-mode adaptor's)
    ("vocab", "tensor"),  # token embedding rows, LM-head columns
    ("layers", None),  # the stacked-layers axis of LayerStack (what scan_layers scans)
    ("conv", None),  # Whisper conv kernel taps (3)
    ("mel", None),  # Whisper conv1 input channels: the mel bins
    ("embed_in", None),  # Whisper conv2 input channels (d_model)
    ("audio_embed", None),  # adaptor input: the Whisper width ("encoder" mode: times stack_factor)
    # Activations:
    ("batch", ("data", "fsdp")),  # rows of a batch
    ("length", None),  # sequence positions (tokens, audio frames)
    ("head_dim", None),  # features of one attention head
    ("act_embed", None),  # hidden states' width between layers
    ("act_heads", "tensor"),  # attention query heads and their outputs
    ("act_kv_heads", "tensor"),  # attention key/value heads
    ("act_mlp", "tensor"),  # MLP hidden activations
    ("act_vocab", "tensor"),  # logits
)

# The device mesh, outermost axis first: config.mesh.shape gives each axis's size, and one of them
# may be -1 (the devices left over). tensor is innermost, on the fastest links.
MESH_AXES = (
    "data",  # data parallelism: the batch splits, every device holds all the weights
    "fsdp",  # the batch splits too, and so do the weights' "embed" dimension (gathered layer by layer)
    "tensor",  # tensor parallelism: heads, MLP widths and the vocab split
)

# config.train.loss: cross-entropy on the reference answer, distillation from the frozen LLM
# reading the transcript as text (KL between next-token distributions on the answer tokens), or
# (1 - kd_weight) * CE + kd_weight * KL, each a mean over the batch's answer tokens.
LOSSES = ("ce", "kd", "mix")


def _fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


def _check_keys(where: str, given: Mapping[str, Any], valid: list[str]) -> None:
  for key in given:
    if key not in valid:
      raise UserError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")


def _as_dict(section: Any, where: str) -> dict[str, Any]:
  if section is None:
    return {}
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise UserError(f"{where} should be a ConfigDict or dict of overrides, got {type(section).__name__}")


def _rope_scaling(value: Any) -> RopeScaling:
  if isinstance(value, RopeScaling):
    return value
  kw = _as_dict(value, "config.model.llm.rope_scaling")
  _check_keys("config.model.llm.rope_scaling", kw, _fields(RopeScaling))
  return RopeScaling(**kw)


def llasm_config(model_cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> LlasmConfig:
  """`config.model` -> LlasmConfig: the preset with the overrides applied."""
  kw = _as_dict(model_cfg, "config.model")
  preset = kw.pop("preset", None)
  if preset not in LLASM_PRESETS:
    raise UserError(f"config.model.preset {preset!r}: expected one of {', '.join(LLASM_PRESETS)}")
  base = LLASM_PRESETS[preset]
  audio_kw = _as_dict(kw.pop("audio", None), "config.model.audio")
  llm_kw = _as_dict(kw.pop("llm", None), "config.model.llm")
  top = [n for n in _fields(LlasmConfig) if n not in ("audio", "llm")]
  _check_keys("config.model", kw, ["preset", "audio", "llm", *top])
  _check_keys("config.model.audio", audio_kw, _fields(WhisperConfig))
  _check_keys("config.model.llm", llm_kw, _fields(LlamaConfig))
  if "rope_scaling" in llm_kw:
    llm_kw["rope_scaling"] = _rope_scaling(llm_kw["rope_scaling"])
  if "lora" in llm_kw:  # one place sets it, so that a run's LoRA is the one its optimizer knows
    raise UserError("config.model.llm.lora: LoRA is set in config.train.lora (rank, alpha, dropout, targets)")
  return base.replace(audio=base.audio.replace(**audio_kw), llm=base.llm.replace(**llm_kw), **kw)


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Imports an ml_collections config file and returns its `get_config()`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} not found; pass --config with a file from configs/")
  spec = importlib.util.spec_from_file_location(f"llasm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {str(path)!r} has no get_config()")
  return module.get_config()


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
      # "ce", "kd" or "mix" (see LOSSES). The teacher of "kd"/"mix" is the frozen LLM reading each
      # audio's transcript as text, so the LLM must stay frozen (stage 1) and the data must carry
      # transcripts (ASR datasets; instruction datasets built with their spoken turns' text).
      loss="ce",
      kd_weight=0.5,  # "mix": loss = (1 - kd_weight) * CE + kd_weight * KL
      kd_temperature=1.0,  # softmax temperature of both distributions (the KL is scaled by its square)
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
  # The training batches (llasm_jax/data/pipeline.py; "synthetic": llasm_jax/train/synthetic.py).
  data = ml_collections.ConfigDict(dict(
      source="synthetic",  # or "tfds": the datasets of `llasm-jax data build`
      dir="",  # "tfds": comma-separated folders written by `llasm-jax data build`
      tokenizer="",  # "tfds": tokenizer folder; default: config.train.init_from (a model folder)
      template="llasm-cllama2",  # "tfds": llasm-cllama2 | llasm-baichuan | chat-template
      # The system prompt, in training and in config.eval: None = LLaSM's (templates.LLASM_SYSTEM),
      # "" = none, so a chat template writes its own default (e.g. SmolLM2's), or any text.
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


def loss_options(train: Any) -> tuple[str, float, float]:
  """`config.train.{loss, kd_weight, kd_temperature}`, checked; absent keys: ("ce", 0.5, 1.0)."""
  loss = train.get("loss", "ce")
  weight, temperature = float(train.get("kd_weight", 0.5)), float(train.get("kd_temperature", 1.0))
  if loss not in LOSSES:
    raise UserError(f"config.train.loss {loss!r}: expected one of {', '.join(LOSSES)}")
  if loss == "mix" and not 0.0 <= weight <= 1.0:
    raise UserError(f"config.train.kd_weight {weight}: expected a share between 0 and 1 (loss = (1 - w) CE + w KL)")
  if loss != "ce" and not temperature > 0:
    raise UserError(f"config.train.kd_temperature {temperature}: expected > 0 (1.0 = the plain distributions)")
  return loss, weight, temperature


def needs_teacher(config: Any) -> bool:
  """Whether the batches of `config` carry the distillation teacher's text sequences."""
  return loss_options(config.get("train") or {})[0] != "ce"


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


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies `--config.a.b=value` command-line overrides, typed like the existing field."""
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise UserError(f"{item!r}: overrides look like --config.train.steps=100")
    path, raw = item[len("--config."):].split("=", 1)
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise UserError(f"--config.{path}: config has no section {p!r}")
      node = node[p]
    if leaf not in node:
      raise UserError(f"--config.{path}: unknown key {leaf!r}; keys here: {', '.join(sorted(node.keys()))}")
    node[leaf] = _parse_like(node[leaf], raw, path)


def _parse_like(current: Any, raw: str, path: str) -> Any:
  if isinstance(current, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise UserError(f"--config.{path}={raw}: expected true or false")
    return raw.lower() in ("true", "1")
  if isinstance(current, (int, float)) and not isinstance(current, bool):
    try:
      return type(current)(float(raw)) if isinstance(current, int) and float(raw).is_integer() else float(raw) \
          if isinstance(current, float) else int(raw)
    except ValueError:
      raise UserError(f"--config.{path}={raw}: expected a {type(current).__name__}") from None
  if isinstance(current, (tuple, list)):
    # A Python literal ('("adaptor/.*", "llm/.*")', "(128, 256)"), else text: one string, or
    # several separated by commas (regexes with a comma of their own need the literal form).
    value = _literal(raw)
    if value is None or isinstance(value, str):
      return tuple(p.strip() for p in raw.split(",") if p.strip()) if value is None else (value,)
    if not isinstance(value, (tuple, list)):
      value = (value,)
    if current and isinstance(current[0], str) and not all(isinstance(v, str) for v in value):
      raise UserError(f"--config.{path}={raw}: expected strings, e.g. --config.{path}=a,b or '(\"a\", \"b\")'")
    return tuple(value)
  if current is None:  # e.g. data.system: None stays None, anything else is the text
    return None if raw == "None" else raw
  return raw


def _literal(raw: str):
  """`raw` as a Python literal, None when it is not one (bare text)."""
  import ast

  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return None
