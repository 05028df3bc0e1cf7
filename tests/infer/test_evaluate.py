"""`llasm-jax eval`: scoring against hand computations, prompts and answers against `generate`, the CLI, cached
datasets, Whisper folders, and the trainer's `config.eval` hook."""

import glob
import json
import os
import struct

import jiwer
import numpy as np
import pytest

from llasm_jax import cli
from llasm_jax.data import builders, pipeline, sources, templates
from llasm_jax.data.audio import from_int16
from llasm_jax.infer.evaluate import LlasmAnswers, evaluate, read_rows, run
from llasm_jax.infer.scoring import answer_f1, answer_tokens

INSTRUCTIONS = [
    {"id": "c1", "conversations": [
        {"from": "human", "value": "<audio>\nWhat does the speaker ask?", "audio": "speech_en/weather.wav"},
        {"from": "gpt", "value": "The weather in Paris is sunny."}]},
    {"id": "c2", "conversations": [
        {"from": "human", "value": "<audio>", "audio": "speech_en/hello_world.wav"},
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "<audio>\n请回答。", "audio": "speech_zh/llasm_example_2.mp3"},
        {"from": "gpt", "value": "北京是中国的首都。"}]},
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, assets):
  """The shared assets as an ASR dataset (4 English, 3 Chinese rows) and two spoken conversations."""
  root = tmp_path_factory.mktemp("eval_data")
  asr = builders.build("asr", builders.manifest_rows(os.path.join(assets, "manifest.jsonl")), str(root / "asr"),
                       quiet=True)
  (root / "conv.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in INSTRUCTIONS))
  inst = builders.build("instructions", builders.instruction_rows(str(root / "conv.jsonl"), assets),
                        str(root / "inst"), quiet=True)
  return {"asr": asr.path, "inst": inst.path, "root": root}


# ---- scoring, with answers we choose -----------------------------------------------------

# Answers by row id (the two "weather" rows, wav and flac, take theirs in dataset order), with the
# reference and answer as Whisper's normalizers leave them, written out by hand (English: lower
# case, no punctuation, spelled numbers as one digit string; Chinese: no punctuation or spaces).
ASR_CASES = {
    "hello_world": [("Hello world. This is the short test of speech pipeline!",  # a -> the, the dropped: 2 of 11
                     "hello world this is a short test of the speech pipeline",
                     "hello world this is the short test of speech pipeline")],
    "weather": [("What will the weather be like in Paris this weekend?",  # casing, punctuation: 0 of 10
                 "what will the weather be like in paris this weekend",
                 "what will the weather be like in paris this weekend"),
                ("what will weather be like in paris this week end",  # the dropped, week + end: 3 of 10
                 "what will the weather be like in paris this weekend",
                 "what will weather be like in paris this week end")],
    "counting": [("One, two, three, four, five, six, seven, nine, ten, eleven.", "12345678910", "123456791011")],  # 1 of 1
    "llasm_example_0": [("请介绍一下勾股定理。", "请介绍一下勾股定理", "请介绍一下勾股定理")],  # 0 of 9
    "llasm_example_1": [("世界上人口最多的是那个国家", "世界上人口最多的是哪个国家", "世界上人口最多的是那个国家")],  # 1 of 13
    "llasm_example_2": [("请介绍 北京市！", "请介绍一下北京", "请介绍北京市")],  # 3 of 7
}
ROW_SCORES = {"hello_world": [2 / 11], "weather": [0, 3 / 10], "counting": [1], "llasm_example_0": [0],
              "llasm_example_1": [1 / 13], "llasm_example_2": [3 / 7]}


def test_asr_scores_equal_a_hand_computation(datasets):
  seen = {k: 0 for k in ASR_CASES}

  def stub(rows):
    texts = []
    for r in rows:
      texts.append(ASR_CASES[r.id][seen[r.id]][0])
      seen[r.id] += 1
    return texts

  report = evaluate("unused", datasets["asr"], batch=3, answer=stub)
  assert sorted(seen.items()) == sorted((k, len(v)) for k, v in ASR_CASES.items())
  occurrence = {k: 0 for k in ASR_CASES}
  en_refs, en_hyps, zh_refs, zh_hyps = [], [], [], []
  for r in report.rows:
    _, ref, hyp = ASR_CASES[r.id][occurrence[r.id]]
    assert (r.normalized_reference, r.normalized_hypothesis) == (ref, hyp), r.id
    assert r.score == pytest.approx(ROW_SCORES[r.id][occurrence[r.id]]), r.id
    assert r.metric == ("cer" if r.language == "zh" else "wer")
    (zh_refs if r.language == "zh" else en_refs).append(ref)
    (zh_hyps if r.language == "zh" else en_hyps).append(hyp)
    occurrence[r.id] += 1
  t = report.totals
  # Corpus rates (errors over all reference units), not a mean of row rates.
  assert t["wer"] == pytest.approx((2 + 0 + 3 + 1) / (11 + 10 + 10 + 1)) == pytest.approx(jiwer.wer(en_refs, en_hyps))
  assert t["cer"] == pytest.approx((0 + 1 + 3) / (9 + 13 + 7)) == pytest.approx(jiwer.cer(zh_refs, zh_hyps))
  assert (t["wer_rows"], t["wer_errors"], t["wer_units"], t["cer_rows"], t["cer_units"]) == (4, 6, 32, 3, 29)
  assert "f1" not in t
  table = report.table(worst=2)
  assert "worst 2 of 4 by wer" in table and "worst 2 of 3 by cer" in table
  assert table.index("1.000") < table.index("0.300") and "hyp: One, two" in table
  assert report.summary().startswith("wer 18.75% (4 rows, 32 words) | cer 13.79% (3 rows, 29 chars)")


def test_answer_f1_equals_a_hand_computation(datasets):
  replies = {"c1": "It is sunny in Paris", "c2": "北京是首都"}
  report = evaluate("unused", datasets["inst"], answer=lambda rows: [replies[r.id] for r in rows])
  # c1: reference words weather in paris is sunny (the article goes), reply it is sunny in paris:
  # 4 shared, precision 4/5, recall 4/5. c2: 8 characters 北京是中国的首都 against 5, all shared.
  f1 = [0.8, 2 * 1 * (5 / 8) / (1 + 5 / 8)]
  assert [r.reference for r in report.rows] == ["The weather in Paris is sunny.", "北京是中国的首都。"]
  assert [r.score for r in report.rows] == pytest.approx(f1)
  assert report.totals["f1"] == pytest.approx(np.mean(f1)) and report.totals["f1_rows"] == 2
  assert answer_tokens("The cat's hat, a Hat!") == ["cats", "hat", "hat"]
  assert answer_f1("", "") == 1.0 and answer_f1("paris", "") == 0.0 and answer_f1("x y", "z") == 0.0


# ---- a tiny LLaSM, end to end -------------------------------------------------------------


def test_llasm_prompts_and_answers_equal_generate(ckpts, gen, datasets, tmp_path):
  """Prompts are the training prompts minus the answer (stage 1: the first instruction, after the
  audio); answers are what `Generator.generate` gives the same conversation; cached features
  (`data encode`, float32) give the same answers as the raw audio."""
  from llasm_jax.data.encode import encode

  tok = gen.tokenizer
  for name in ("asr", "inst"):
    source = pipeline.Source(datasets[name])
    answers = LlasmAnswers.for_source(gen, source, max_new_tokens=5)
    rows = read_rows(source, limit=4)  # 3 Chinese rows and an English one; 2 conversations
    report = run(rows, answers, batch=4)
    conversations, audios = [], []
    for row in rows:
      audios.append(sources.record_audios(row.record, source.kind))
      if name == "asr":
        pool = templates.TRANSCRIBE_ZH if row.language == "zh" else templates.TRANSCRIBE_EN
        conversations.append([{"role": "user", "content": f"{templates.AUDIO}\n{pool[0]}"}])
      else:
        turns = list(zip(row.record["roles"].tolist(), [v.decode() for v in row.record["values"]]))[:-1]
        conversations.append([{"role": ("user", "assistant")[r], "content": v} for r, v in turns])
    # One batch as eval runs it (the same executable), its prompts built from the messages.
    refs = gen.generate(conversations, audios, max_new_tokens=5)
    assert [answers.prompt(r.record)[0] for r in rows] == [ref.prompt_token_ids for ref in refs]
    assert [r.hypothesis for r in report.rows] == [ref.text.strip() for ref in refs]
    # The generation slot: the prompt ends where the llasm-cllama2 template's answer starts.
    assert tok.decode(answers.prompt(rows[-1].record)[0]).endswith("[/INST] ")
    if name == "asr":
      cached = encode(ckpts["llasm"], datasets["asr"], str(tmp_path / "cached"), dtype="float32", batch_size=4,
                      quiet=True)
      source = pipeline.Source(cached.path)
      answers = LlasmAnswers.for_source(gen, source, max_new_tokens=5)
      assert [r.hypothesis for r in run(read_rows(source, limit=4), answers, batch=4).rows] == [
          ref.text.strip() for ref in refs]
      assert gen.engine.traces["adapt"] >= 1


def run_cli(capsys, *argv):
  code = cli.main(list(argv))
  out = capsys.readouterr()
  return code, out.out, out.err


def test_cli_eval_on_a_converted_llasm(ckpts, datasets, capsys, tmp_path):
  out = tmp_path / "report.json"
  code, stdout, err = run_cli(capsys, "eval", "--ckpt", ckpts["llasm"], "--data", datasets["asr"], "--limit", "4",
                              "--batch", "2", "--max-new-tokens", "4", "--out", str(out))
  assert code == 0, err
  report = json.loads(out.read_text())
  assert report["model_kind"] == "llasm" and len(report["rows"]) == 4
  assert (report["totals"]["cer_rows"], report["totals"]["wer_rows"]) == (3, 1)
  assert {"audio_s", "prefill_s", "decode_s", "total_s"} <= set(report["timings"])
  zh = [r for r in report["rows"] if r["language"] == "zh"]
  assert report["totals"]["cer"] == pytest.approx(jiwer.cer([r["normalized_reference"] for r in zh],
                                                            [r["normalized_hypothesis"] for r in zh]))
  assert "worst 3 of 3 by cer" in stdout and stdout.strip().splitlines()[-2].startswith("wer ")


def test_a_whisper_folder_transcribes(whisper, datasets):
  """The baseline: a Whisper folder's transcripts, each in its row's language, as transformers gives them."""
  import transformers

  from llasm_jax.infer.evaluate import WhisperAnswers, load_answers
  from tests.infer.test_transcribe import N, hf_generate

  model, tr, root = whisper
  source = pipeline.Source(datasets["asr"])
  answers, kind = load_answers(str(root / "ck"), source, batch=4, max_new_tokens=N)
  assert kind == "whisper" and isinstance(answers, WhisperAnswers)
  # The fixture's transcriber (the same folder) runs them: its executable is compiled already.
  report = run(read_rows(source, limit=4), WhisperAnswers(tr, N, batch_size=4), batch=4)
  tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
  audios = [from_int16(r.record["audio"]) for r in report.rows]
  refs = []
  for lang in ("zh", "en"):
    chosen = [i for i, r in enumerate(report.rows) if r.language == lang]
    ids = hf_generate(model, [audios[i] for i in chosen], task="transcribe", language=lang)
    refs += [(i, tok.decode(x, skip_special_tokens=True).strip()) for i, x in zip(chosen, ids)]
  assert [r.hypothesis for r in report.rows] == [text for _, text in sorted(refs)]
  assert report.totals["cer_rows"] == 3 and report.totals["wer_rows"] == 1 and report.timings["windows"] == 4


@pytest.mark.parametrize("which, data, message", [
    ("llasm", "missing", "no dataset (dataset_info.json) found"),
    ("whisper", "inst", "is a Whisper, which transcribes, but"),
    ("llama", "asr", "is a text-only LLM ('llama'), which cannot hear"),
    ("nowhere", "asr", "no such folder"),
])
def test_cli_eval_input_errors(ckpts, datasets, capsys, tmp_path, which, data, message):
  ckpt = str(tmp_path / "nope") if which == "nowhere" else ckpts[which]
  data = str(tmp_path / "missing") if data == "missing" else datasets[data]
  code, _, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--data", data)
  assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ---- during training ---------------------------------------------------------------------


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] from the event files (TFRecord framing, tensorboardX's Event proto)."""
  from tensorboardX.proto import event_pb2

  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "*"))):
    data, i = open(path, "rb").read(), 0
    while i < len(data):
      n, = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_training_evaluates_its_parameters(ckpts, datasets, tmp_path):
  """config.eval every step of a 2-step stage-1 run: eval/cer in TensorBoard and the summary; the
  last evaluation (in-memory parameters) equals `eval` of the model folder the run wrote."""
  from llasm_jax.train.trainer import train
  from tests.train.test_train import tiny_config

  config = tiny_config(stage=1, steps=2)
  config.train.init_from = ckpts["llasm"]
  config.train.batch_size = 2
  config.optim.lr = 0.05  # large enough that one step changes the answers' logits
  config.data.update(dict(source="tfds", dir=datasets["asr"], seq_len=640, mel_frames=3000, workers=-1))
  config.eval.update(dict(every=1, data=datasets["asr"], limit=2, max_new_tokens=3, batch=2))
  summary = train(config, str(tmp_path / "work"))
  # The dataset's first two rows are Chinese: CER.
  assert [e["step"] for e in summary["eval"]] == [1, 2] and all(0 <= e["cer"] for e in summary["eval"])
  scalars = tensorboard_scalars(tmp_path / "work" / "tensorboard")
  assert [s for s, _ in scalars["eval/cer"]] == [1, 2] and "eval/wer" not in scalars
  assert [v for _, v in scalars["eval/cer"]] == pytest.approx([e["cer"] for e in summary["eval"]])
  last = json.loads((tmp_path / "work" / "eval" / "step_2.json").read_text())
  again = evaluate(str(tmp_path / "work" / "model"), datasets["asr"], limit=2, batch=2, max_new_tokens=3,
                   mel_frames=3000)
  assert [r["hypothesis"] for r in last["rows"]] == [r.hypothesis for r in again.rows]
  # The trained model folder keeps the companion files of the one it started from, whisper/ included.
  companions = [n for n in os.listdir(ckpts["llasm"]) if n.endswith((".json", ".jinja", ".model"))
                and n != "llasm_jax.json"]
  companions += [f"whisper/{n}" for n in os.listdir(os.path.join(ckpts["llasm"], "whisper"))]
  assert "tokenizer.json" in companions and "hf_llm_config.json" in companions
  for name in companions:
    assert (tmp_path / "work" / "model" / name).exists(), name
