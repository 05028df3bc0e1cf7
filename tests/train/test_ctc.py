"""The adaptor's CTC loss (config.train.loss "ctc", ctc_weight): optax's CTC against a sum over every
alignment, the step against logits built by hand, CE + CTC weighting and accumulation, infeasible
rows, no LLM work in a "ctc" step, a tiny adaptor learning, the pipeline's targets and the trainer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llasm_jax import tokens
from llasm_jax.data import contract, featurize, pipeline
from llasm_jax.errors import UserError
from llasm_jax.train import data_config
from llasm_jax.models.llasm import LLASM_PRESETS, Llasm
from llasm_jax.train import trainer
from llasm_jax.train.setup import make_data, prepare
from llasm_jax.train.step import TrainState, make_train_step
from llasm_jax.train.synthetic import make_example
from tests.data.conftest import tiny_model
from tests.train.test_train import tiny_config

# ---- optax's CTC against an independent reference ------------------------------------------------


def brute_force_ctc(logits, labels, blank):
  """-log sum over every frame path that collapses (merge repeats, drop blanks) to `labels`."""
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  total = 0.0
  for path in itertools.product(range(logits.shape[1]), repeat=len(logits)):
    merged = [c for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
    if [c for c in merged if c != blank] == list(labels):
      total += np.exp(sum(logp[t, c] for t, c in enumerate(path)))
  return -np.log(total)


@pytest.mark.parametrize("labels,frames", [([1], 2), ([1, 2], 3), ([2, 2], 3), ([1], 3)])
def test_optax_ctc_is_the_sum_over_alignments(labels, frames):
  rng = np.random.default_rng(len(labels) * 10 + frames)
  logits = rng.normal(size=(frames, 4))  # classes 0..2 tokens, 3 the blank
  want = brute_force_ctc(logits, labels, blank=3)
  # Two padding frames in the middle are skipped (a row's audio slots align as one sequence).
  padded = np.concatenate([logits[:1], rng.normal(size=(2, 4)), logits[1:]])
  paddings = np.float32([0, 1, 1] + [0] * (frames - 1))
  got = optax.ctc_loss(jnp.asarray(padded[None], jnp.float32), jnp.asarray(paddings[None]),
                       jnp.int32([labels]), jnp.zeros((1, len(labels))), blank_id=3)
  np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)


# ---- the step on a tiny model ---------------------------------------------------------------------


def tiny_setup(loss="ce", grad_accum=1, steps=3, **train):
  config = tiny_config(stage=1, steps=steps, loss=loss, grad_accum=grad_accum, **train)
  config.train.batch_size = 4
  return config, prepare(config)


def ctc_batch(cfg, config, b=4, seed=0):
  """Synthetic rows (tiny_config: 160 mel frames, 20 adaptor frames per row) with transcripts:
  rows 0-1 short, row 2 without one, row 3 infeasible (12 equal tokens need 23 frames)."""
  rows = [make_example(cfg, config.data, seed, i) for i in range(b)]
  host = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  u = data_config.pipeline_config(config, cfg).ctc_width
  assert u == 20
  rng = np.random.default_rng(seed)
  labels = np.zeros((b, u), np.int32)
  lengths = np.int32([5, 8, 0, 12])
  labels[0, :5], labels[1, :8] = rng.integers(3, 250, 5), rng.integers(3, 250, 8)
  labels[3, :12] = 7
  host.update(ctc_labels=labels, ctc_label_lengths=lengths)
  return host


def run_step(setup, host, params, rest, **kw):
  step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.labels, **{"grad_accum": 1, **kw}))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=setup.tx.init(params),
                     rng=jnp.zeros((2,), jnp.uint32))
  new, metrics = step(state, {k: jnp.asarray(v) for k, v in host.items()})
  return {k: float(v) for k, v in metrics.items()}, new


def init(setup, seed=0):
  _, params, rest = nnx.split(Llasm(setup.cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
  return params, rest


def hand_ctc_mean(model, host):
  """The CTC mean per label token written out: adaptor outputs . E^T and the blank column in
  numpy (float64), optax per row, feasible rows only (rows 0 and 1)."""
  embeds, valid = model.embed_audio(jnp.asarray(host["mel"]), jnp.asarray(host["mel_lengths"]))
  x = np.asarray(embeds, np.float64).reshape(len(host["mel"]), -1, embeds.shape[-1])
  table = np.asarray(model.llm.model.embed_tokens.embedding[...], np.float64)[:model.cfg.llm.vocab_size]
  w, bias = np.asarray(model.ctc_blank.kernel[...], np.float64), float(model.ctc_blank.bias[...])
  logits = np.concatenate([x @ table.T, (x @ w + bias)[..., None]], axis=-1)
  paddings = 1.0 - np.asarray(valid, np.float32).reshape(len(x), -1)
  total, count = 0.0, 0
  for row in (0, 1):
    n = int(host["ctc_label_lengths"][row])
    loss = optax.ctc_loss(jnp.asarray(logits[row:row + 1], jnp.float32), jnp.asarray(paddings[row:row + 1]),
                          jnp.asarray(host["ctc_labels"][row:row + 1, :n]), jnp.zeros((1, n)),
                          blank_id=table.shape[0])
    total, count = total + float(loss[0]), count + n
  return total / count


def test_ctc_step_equals_hand_logits_and_masks_infeasible_rows():
  config, setup = tiny_setup("ctc")
  assert setup.cfg.ctc  # the run config turned the blank on
  host = ctc_batch(setup.cfg, config)
  params, rest = init(setup)
  metrics, new = run_step(setup, host, params, rest, loss="ctc")
  want = hand_ctc_mean(nnx.merge(setup.graphdef, params, rest), host)
  np.testing.assert_allclose([metrics["loss"], metrics["ctc"]], [want, want], rtol=1e-5)
  assert metrics["ctc_tokens"] == 13 and metrics["ctc_infeasible"] == 1 and metrics["ctc_rows"] == 3
  assert "ce" not in metrics and np.isfinite(metrics["grad_norm"]) and metrics["update_applied"]
  # The blank trains with the adaptor (config.train.trainable names only the adaptor); the LLM does not move.
  from llasm_jax.train.optim import TRAIN, path_str
  trained = {path_str(p) for p, lab in jax.tree_util.tree_leaves_with_path(setup.labels) if lab == TRAIN}
  assert {"ctc_blank/kernel", "ctc_blank/bias"} <= trained and not any(p.startswith("llm/") for p in trained)
  old, upd = nnx.to_pure_dict(params), nnx.to_pure_dict(new.params)
  np.testing.assert_array_equal(old["llm"]["model"]["embed_tokens"]["embedding"],
                                upd["llm"]["model"]["embed_tokens"]["embedding"])


def test_ctc_logits_score_the_real_vocab_of_a_padded_table():
  base = LLASM_PRESETS["tiny_encoder"]
  cfg = base.replace(ctc=True, llm=base.llm.replace(vocab_size=300, vocab_multiple=128))
  model = Llasm(cfg, rngs=nnx.Rngs(0))
  assert model.llm.model.embed_tokens.embedding.shape[0] == 384
  x = np.random.default_rng(0).normal(size=(2, 3, 64)).astype(np.float32)
  got = np.asarray(model.ctc_logits(jnp.asarray(x)))
  table = np.asarray(model.llm.model.embed_tokens.embedding[...])[:300]
  assert got.shape == (2, 3, 301)
  np.testing.assert_allclose(got[..., :300], x @ table.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[..., 300], np.log(300.0), rtol=1e-6)  # zero kernel, bias log V at init


def test_ce_plus_ctc_is_the_weighted_sum_and_accumulates():
  w = 0.3
  config, setup = tiny_setup("ce", ctc_weight=w)
  host = ctc_batch(setup.cfg, config)
  params, rest = init(setup)
  both, new = run_step(setup, host, params, rest, loss="ce", ctc_weight=w)
  ce_only, _ = run_step(setup, host, params, rest, loss="ce")
  ctc_only, _ = run_step(setup, host, params, rest, loss="ctc")
  np.testing.assert_allclose(both["ce"], ce_only["loss"], rtol=1e-6)
  np.testing.assert_allclose(both["ctc"], ctc_only["loss"], rtol=1e-6)
  np.testing.assert_allclose(both["loss"], ce_only["loss"] + w * ctc_only["loss"], rtol=1e-6)
  # Two microbatches (rows 0, 2 and 1, 3): CE and CTC token counts differ per microbatch.
  accum, accum_new = run_step(setup, host, params, rest, loss="ce", ctc_weight=w, grad_accum=2)
  np.testing.assert_allclose(accum["loss"], both["loss"], rtol=1e-5)
  assert accum["ctc_infeasible"] == both["ctc_infeasible"] == 1
  for a, b in zip(jax.tree.leaves(accum_new.params), jax.tree.leaves(new.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def cached_batch(cfg, config, host):
  """The rows with cached-feature audio instead of mel (no Whisper in the step)."""
  model = Llasm(cfg, rngs=nnx.Rngs(0))
  feats, lengths = model.encode_audio(jnp.asarray(host["mel"]), jnp.asarray(host["mel_lengths"]))
  out = {k: v for k, v in host.items() if k not in ("mel", "mel_lengths")}
  return {**out, "audio_features": np.asarray(feats), "audio_feature_lengths": np.asarray(lengths)}


def test_a_ctc_step_has_no_llm_work():
  """Compiled FLOPs of the "ctc" step on cached features are below one LLM forward of the batch, and
  below the CE step's by more than one: an LLM pass in its graph would add at least that."""
  config, setup = tiny_setup("ctc")
  host = cached_batch(setup.cfg, config, ctc_batch(setup.cfg, config))
  params, rest = init(setup)

  def flops(loss):
    step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.labels, grad_accum=1, loss=loss))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=setup.tx.init(params),
                       rng=jnp.zeros((2,), jnp.uint32))
    cost = step.lower(state, {k: jnp.asarray(v) for k, v in host.items()}).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

  llm = setup.cfg.llm
  layer = llm.hidden_size * llm.kv_head_dim * (2 * llm.num_attention_heads + 2 * llm.num_key_value_heads) \
      + 3 * llm.hidden_size * llm.intermediate_size
  llm_forward = 2 * host["input_ids"].size * llm.num_hidden_layers * layer
  ctc, ce = flops("ctc"), flops("ce")
  assert ce > llm_forward  # the reference is real: the CE step does run the LLM
  # Measured: ctc 15.7 MFLOP (adaptor, CTC head and optax's alignment scan, forward and backward),
  # ce 49.1, one LLM forward 23.6: the CE step's extra work is its LLM pass, which the CTC step lacks.
  assert ctc < llm_forward and ctc + llm_forward < ce, (ctc, llm_forward, ce)


def test_ctc_trains_a_tiny_adaptor():
  config, setup = tiny_setup("ctc", steps=40)
  # Measured (lr 1e-2, 40 steps): 6.27 -> 2.70 with the blank's bias at log V; 16.97 -> 2.61 at 0.
  config.optim.lr = 1e-2
  setup = prepare(config)
  host = ctc_batch(setup.cfg, config)
  host["ctc_label_lengths"][3] = 4  # every row with a transcript feasible
  batch = {k: jnp.asarray(v) for k, v in cached_batch(setup.cfg, config, host).items()}
  params, rest = init(setup)
  step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.labels, grad_accum=1, loss="ctc"),
                 donate_argnums=(0,))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=setup.tx.init(params),
                     rng=jnp.zeros((2,), jnp.uint32))
  history = []
  for _ in range(40):
    state, metrics = step(state, batch)
    history.append(float(metrics["ctc"]))
  assert history[-1] < 0.6 * history[0], history


def test_ctc_options_are_checked():
  with pytest.raises(UserError, match="ctc_weight -1.0"):
    prepare(tiny_config(stage=1, ctc_weight=-1.0))
  with pytest.raises(UserError, match="config.train.loss 'ctcx': expected one of ce, kd, mix, ctc"):
    prepare(tiny_config(stage=1, loss="ctcx"))
  with pytest.raises(UserError, match="does not pack CTC targets"):
    pipeline.PipelineConfig.from_model(tiny_model("encoder"), ctc=True, packing=True)
  with pytest.raises(UserError, match="synthetic batches lack"):
    make_data(tiny_config(stage=1, loss="ctc"), LLASM_PRESETS["tiny_encoder"])


def test_compile_only_knows_the_ctc_keys():
  for loss, weight in (("ctc", 0.0), ("ce", 0.5)):
    out = trainer.compile_only(tiny_config(stage=1, loss=loss, ctc_weight=weight), quiet=True)
    assert out["argument_size_gib"] > 0


# ---- the pipeline's targets -----------------------------------------------------------------------


def test_pipeline_ctc_targets_are_the_transcripts(tokenizer_dir):
  tok = tokens.load_tokenizer(tokenizer_dir)
  model = tiny_model("encoder")
  source = pipeline.SyntheticSource("instructions", 4, seed=3, max_turns=2, seconds=(1.0, 2.0))
  cfg = pipeline.PipelineConfig.from_model(model, ctc=True, system="", seq_len=256, max_audios=4, mel_frames=100)
  with pipeline.make_iterator(source, cfg, tokenizer_dir, batch_size=4, shard_index=0, shard_count=1) as it:
    batch = next(it)
  contract.check_batch(batch, model)
  assert batch["ctc_labels"].shape == (4, cfg.ctc_width)
  wanted = [[j for t in source[i]["transcripts"] for j in featurize.ctc_token_ids(tok, t.decode())]
            for i in range(4)]
  for row in range(4):
    n = int(batch["ctc_label_lengths"][row])
    assert n > 0 and list(batch["ctc_labels"][row, :n]) in wanted
  # Mid-text tokens: the transcript as it reads after a word.
  ids = featurize.ctc_token_ids(tok, "hello world")
  assert tok.decode(ids).strip() == "hello world"
  assert ids == tok.encode("USER: hello world", add_special_tokens=False)[-len(ids):]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  from tests.data.conftest import train_llama_tokenizer

  folder = tmp_path_factory.mktemp("ctc_tok")
  train_llama_tokenizer(folder).save_pretrained(str(folder / "hf"))
  return str(folder / "hf")


# ---- the trainer: a CTC warm phase from a fresh `convert`, then CE + CTC, then export ---------------

# The asset clips (2.9-4.5 s, each two 3 s windows) say 22-41 tokens of the tiny 300-token BPE (0-1
# repeats): at the default stack factor 8 they become 18-29 adaptor frames and no row can align.
# At 3 (50 frames per 3 s window) they become 48-76, every clip 1.3x-2.3x its tokens + repeats.
CTC_STACK = 3


@pytest.fixture(scope="module")
def asset_run(tmp_path_factory, assets):
  """The asset clips as an ASR dataset, and the tiny HF LLaMA + Whisper pair to convert."""
  import os

  from llasm_jax.data import builders
  from tests.infer.conftest import save_hf_pair

  root = tmp_path_factory.mktemp("ctc_assets")
  raw = str(root / "asr")
  builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")), raw, quiet=True)
  save_hf_pair(root)
  return root, raw


def fresh_encoder(root, out, stack_factor=None):
  from llasm_jax.convert.convert import convert

  convert(str(root / "hf_llm"), str(root / "hf_whisper"), out=str(out), mode="encoder", stack_factor=stack_factor,
          progress=False)
  return str(out)


def test_ctc_warm_phase_then_ce_plus_ctc_from_a_converted_folder(asset_run, tmp_path):
  import os

  from llasm_jax import checkpoint
  from llasm_jax.convert.export import export
  from tests.train.test_cached import stage1

  root, raw = asset_run
  fresh = fresh_encoder(root, tmp_path / "encoder", CTC_STACK)
  meta = checkpoint.read_meta(fresh)["config"]
  assert not meta.get("ctc") and meta["stack_factor"] == CTC_STACK
  warm = stage1(fresh, raw)
  warm.data.seq_len = 512  # 2 x 50 audio tokens per row (38 at stack factor 8)
  # Every step's batch is all 7 clips (step 1 runs at lr 0, so steps 1 and 2 score the same
  # batch with the same weights), so the losses compare across steps.
  warm.train.loss, warm.train.steps, warm.train.batch_size = "ctc", 20, 7
  warm.optim.lr = 1e-2
  first = trainer.train(warm, str(tmp_path / "warm"))
  ctc = [h["ctc"] for h in first["history"]]
  assert first["stop_reason"] == "finished" and len(ctc) == warm.train.steps
  assert all(h["ctc_infeasible"] == 0 for h in first["history"]) and all(np.isfinite(ctc))
  np.testing.assert_allclose(ctc[0], ctc[1], rtol=1e-5)
  # Measured: 5.86 -> 4.50 per transcript token in 20 steps (0.77).
  assert ctc[-1] < 0.85 * ctc[0], ctc
  warmed = str(tmp_path / "warm" / "model")
  stored = checkpoint.load_params_numpy(warmed)
  assert {"ctc_blank/kernel", "ctc_blank/bias"} <= set(stored) and checkpoint.read_meta(warmed)["config"]["ctc"]
  check_ctc_readout(warmed, raw)
  then = stage1(warmed, raw)
  then.data.seq_len = warm.data.seq_len
  then.train.ctc_weight = 0.2
  second = trainer.train(then, str(tmp_path / "ce_ctc"))
  assert second["stop_reason"] == "finished"
  for row in second["history"]:
    assert row["ce"] > 0 and row["ctc"] > 0 and row["ctc_infeasible"] == 0
    np.testing.assert_allclose(row["loss"], row["ce"] + 0.2 * row["ctc"], rtol=1e-5)
  # Export leaves the blank out (a training aid); the LLM and adaptor go to PyTorch as before.
  export(warmed, str(tmp_path / "hf"), progress=False)
  names = []
  for folder, _, files in os.walk(tmp_path / "hf"):
    for f in files:
      if f.endswith(".safetensors"):
        from safetensors.numpy import load_file
        names += list(load_file(os.path.join(folder, f)))
  assert names and not any("ctc" in n for n in names)


def check_ctc_readout(folder: str, data: str) -> None:
  """`evaluate.CtcAnswers` spells each row as the greedy collapse of the model's own CTC logits (blank
  and repeats dropped), the same in a batch as alone. The blank is pushed down first, so that the
  frames spell tokens (after 20 steps they are mostly blank)."""
  from llasm_jax.infer import evaluate
  from llasm_jax.infer.generator import Generator

  generator = Generator.load(folder)
  model = generator.engine.model
  model.ctc_blank.bias[...] = jnp.full((), -30.0, model.ctc_blank.bias.dtype)
  source = pipeline.Source(data)
  rows = evaluate.read_rows(source)
  answers = evaluate.CtcAnswers.for_source(generator, source)
  texts = answers(rows)
  assert texts == [answers([r])[0] for r in rows] and all(texts)
  v = model.cfg.llm.vocab_size
  for row, text in zip(rows, texts):
    mel = answers.prompt(row.record)[1][0]
    embeds, valid = model.embed_audio(jnp.asarray(mel)[None, None], jnp.asarray([[mel.shape[1]]]), raw=True)
    best = np.argmax(np.asarray(model.ctc_logits(embeds[0, 0])), axis=-1)[:int(np.sum(valid))]
    spelled = [int(b) for i, b in enumerate(best) if b != v and (i == 0 or b != best[i - 1])]
    assert text == generator.decode(spelled).strip()


def test_infeasible_rows_train_no_ctc_and_warn(asset_run, tmp_path, capsys):
  """At the default stack factor 8 the clips are 18-29 adaptor frames for 22-42 tokens + repeats:
  the rows without enough frames are masked (no CTC loss, no tokens), counted, and the trainer
  says which setting gives more frames."""
  from tests.train.test_cached import stage1

  root, raw = asset_run
  config = stage1(fresh_encoder(root, tmp_path / "encoder"), raw)
  config.train.loss, config.train.steps = "ctc", 1
  summary = trainer.train(config, str(tmp_path / "run"))
  row = summary["history"][-1]
  assert row["loss"] == row["ctc"] == 0 and row["grad_norm"] == 0
  assert row["ctc_infeasible"] == config.train.batch_size
  out = capsys.readouterr().out
  assert f"{config.train.batch_size} of {config.train.batch_size} rows with a transcript have fewer adaptor " \
         "frames than CTC needs" in out and "stack_factor" in out
