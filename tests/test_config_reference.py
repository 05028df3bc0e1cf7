"""docs/config_reference.md is what the config code generates, and every config field is documented."""

import ast
import dataclasses
import pathlib

import pytest

from llasm_jax.train import sections as sections_lib
from llasm_jax import config_reference as ref

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "config_reference.md"


def test_doc_is_up_to_date():
  fresh = DOC.is_file() and DOC.read_text(encoding="utf-8") == ref.render()
  assert fresh, f"docs/config_reference.md is stale (the config code changed); regenerate it: {ref.REGENERATE}"


def test_every_field_has_a_description():
  sections = ref.reference_sections()
  assert not ref.undocumented(sections)
  paths = [s.path for s in sections]
  assert paths == ["model", "model.llm", "model.llm.rope_scaling", "model.audio", "mesh", "logical_axis_rules",
                   "train", "optim", "data", "eval"]
  names = {f"{s.path}.{f.name}" for s in sections for f in s.fields}
  # Fields come from the code as it runs: new ones appear without editing the generator.
  assert {"train.compilation_cache", "train.max_minutes", "model.preset", "model.llm.rope_scaling.factor",
          "mesh.shape.fsdp", "logical_axis_rules.act_vocab"} <= names
  assert {f"train.{k}" for k in sections_lib.training_sections(1)["train"]} <= names


def test_stage_defaults_differ_where_the_code_says():
  optim = {s.path: s for s in ref.reference_sections()}["optim"]
  lr = next(f for f in optim.fields if f.name == "lr")
  assert lr.defaults == (sections_lib.training_sections(1)["optim"].lr, sections_lib.training_sections(2)["optim"].lr)
  assert "`0.001` (stage 1) / `2e-05` (stage 2)" in ref.render()


def test_a_new_training_key_without_a_comment_is_reported(monkeypatch):
  real = sections_lib.training_sections

  def with_new_key(stage):
    sections = real(stage)
    sections["train"].new_knob = 3
    return sections

  monkeypatch.setattr(sections_lib, "training_sections", with_new_key)
  sections = ref.reference_sections()
  assert ref.undocumented(sections) == ["train.new_knob"]
  with pytest.raises(ref.UndocumentedFields, match=r"train\.new_knob.*llasm_jax/train/sections\.py training_sections"):
    ref.render(sections)


def test_training_tables_take_sections_and_comments():
  by_stage = {1: {"train": {"steps": 10, "bare": 1}}, 2: {"train": {"steps": 20, "bare": 1, "only_two": 0}}}
  sections = ref.training_tables(by_stage, {"train": {"steps": "optimizer steps"}})
  assert ref.undocumented(sections) == ["train.bare", "train.only_two"]
  assert [f.defaults for f in sections[0].fields][0] == (10, 20)


@dataclasses.dataclass(frozen=True)
class _Knobs:
  """Knobs for the test."""

  trailing: int = 1  # a trailing comment
  # Comment lines directly above
  # join.
  above: int = 2  # and a trailing one follows them
  bare: int = 3
  a: int = 4; b: int = 5  # noqa: E702  (a line with two fields documents neither)


def test_dataclass_field_comments():
  assert ref.dataclass_comments(_Knobs) == {
      "trailing": "a trailing comment", "above": "Comment lines directly above join. and a trailing one follows them",
      "bare": "", "a": "", "b": ""}
  section = ref.dataclass_section("knobs", _Knobs)
  assert section.intro == "Knobs for the test."
  assert ref.undocumented([section]) == ["knobs.bare", "knobs.a", "knobs.b"]
  with pytest.raises(ref.UndocumentedFields, match="knobs.bare, knobs.a, knobs.b.*tests/test_config_reference.py"):
    ref.check_documented([section])


def test_dict_entry_comments():
  source = "x = dict(\n    # Two lines\n    # joined.\n    a=1,  # then the tail\n    b=2, c=3,  # shared\n    d=(\n" \
           "        4, 5),  # on its last line\n)\n"
  spans = ref.entry_spans(ast.parse(source).body[0].value)
  assert ref.field_comments(source, spans) == {"a": "Two lines joined. then the tail", "b": "", "c": "",
                                               "d": "on its last line"}


def test_cli_out_and_check(tmp_path, capsys):
  out = tmp_path / "reference.md"
  assert ref.main(["--out", str(out)]) == 0
  assert ref.main(["--check", str(out)]) == 0
  out.write_text(out.read_text() + "edited\n")
  assert ref.main(["--check", str(out)]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"python -m llasm_jax.config_reference --out {out}" in err
