"""A Markdown reference of every run-config field, generated from the config code so it cannot drift.

Defaults come from the code at run time (`training_sections(1)` and `(2)`, `from_model_folder`,
`DEFAULT_RULES`, the model dataclasses' fields). Descriptions come from the comments next to each
field in the source: the comment lines directly above the field and its trailing `# ...` comment,
joined. A line that holds two fields documents neither (whose would its comment be?), and a field
left without a description makes generation fail, so that a new field gets its comment.

  python -m llasm_jax.config_reference --out docs/config_reference.md    # regenerate
  python -m llasm_jax.config_reference --check docs/config_reference.md  # exit 1 when stale
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import inspect
import io
import json
import math
import pathlib
import sys
import textwrap
import tokenize
from typing import Any, Mapping, Sequence

from llasm_jax import config as config_lib
from llasm_jax import sharding
from llasm_jax.train import sections as sections_lib
from llasm_jax.models.llama import LLAMA_PRESETS, LlamaConfig, RopeScaling
from llasm_jax.models.llasm import LLASM_PRESETS, LlasmConfig
from llasm_jax.models.whisper import WHISPER_PRESETS, WhisperConfig
from llasm_jax.errors import UserError

REGENERATE = "python -m llasm_jax.config_reference --out docs/config_reference.md"
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

# `config.model.preset` is read by `llasm_config`, not a dataclass field: its description lives here.
PRESET = ("a key of LLASM_PRESETS (see Model presets): the model whose fields the other keys of "
          "config.model override")


@dataclasses.dataclass(frozen=True)
class Field:
  name: str  # the key under its section: config.<section>.<name>
  defaults: tuple[Any, ...]  # one per stage of the section (training sections), else one; () = required
  description: str


@dataclasses.dataclass(frozen=True)
class Section:
  path: str  # "train", "model.llm": its fields are config.<path>.<name>
  intro: str
  source: str  # where the fields' comments live, named in the error for an undocumented field
  fields: tuple[Field, ...]
  stages: tuple[int, ...] = ()  # the stages that `Field.defaults` follow, in a training section
  columns: tuple[str, str, str] = ("field", "default", "description")


class UndocumentedFields(ValueError):
  """Config fields without a comment in the source."""


# ---------------------------------------------------------------------------------------------
# Comments in the source


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """(trailing, alone): each line's `#` comment text, split by whether code stands before it."""
  trailing, alone = {}, {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      text = tok.string.lstrip("#").strip()
      (trailing if tok.line[:tok.start[1]].strip() else alone)[tok.start[0]] = text
  return trailing, alone


def _above(alone: Mapping[int, str], line: int) -> list[str]:
  """The comment lines directly above `line`, in order (a blank or code line ends them)."""
  out = []
  while line - 1 in alone:
    line -= 1
    out.insert(0, alone[line])
  return out


def _join(parts: Sequence[str]) -> str:
  return " ".join(p for p in parts if p)


def field_comments(source: str, spans: Mapping[str, tuple[int, int]]) -> dict[str, str]:
  """Each field's description ("" for none): the comment lines directly above its first line,
  then the trailing comments on its lines. spans: field -> (first, last) line (1-based) in
  `source`. A line shared by two fields gives neither a comment."""
  trailing, alone = _comments(source)
  owners = collections.Counter(line for first, last in spans.values() for line in range(first, last + 1))
  out = {}
  for name, (first, last) in spans.items():
    parts = _above(alone, first) if owners[first] == 1 else []
    parts += [trailing[line] for line in range(first, last + 1) if line in trailing and owners[line] == 1]
    out[name] = _join(parts)
  return out


def entry_spans(node: ast.AST) -> dict[str, tuple[int, int]]:
  """The keys of the first `dict(key=...)` call or `{"key": ...}` display in `node`, or the
  names of a tuple of "name" strings or ("name", ...) tuples, each with its line span."""
  if isinstance(node, ast.Tuple):
    spans = {}
    for elt in node.elts:
      head = elt.elts[0] if isinstance(elt, ast.Tuple) and elt.elts else elt
      if isinstance(head, ast.Constant) and isinstance(head.value, str):
        spans[head.value] = (elt.lineno, elt.end_lineno)
    return spans
  for sub in ast.walk(node):
    if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "dict":
      return {kw.arg: (kw.lineno, kw.end_lineno) for kw in sub.keywords if kw.arg}
    if isinstance(sub, ast.Dict):
      return {k.value: (k.lineno, v.end_lineno) for k, v in zip(sub.keys, sub.values)
              if isinstance(k, ast.Constant) and isinstance(k.value, str)}
  return {}


def _assignment(body: Sequence[ast.stmt], name: str) -> ast.stmt:
  for stmt in body:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
      return stmt
  raise UserError(f"no assignment to {name!r} found")


def _where(obj: Any) -> str:
  """"llasm_jax/models/llama.py LlamaConfig": where to add a missing comment."""
  return f"{obj.__module__.replace('.', '/')}.py {obj.__qualname__}"


def _module_source(obj: Any) -> tuple[str, ast.Module]:
  """The source and syntax tree of the module of `obj`. Of train/sections.py the whole file is
  read, not `inspect.getsource(training_sections)`, so that a test may replace
  `sections.training_sections` without hiding the comments of the real one."""
  source = inspect.getsource(inspect.getmodule(obj))
  return source, ast.parse(source)


def _class_source(cls: type) -> tuple[str, ast.ClassDef]:
  source = textwrap.dedent(inspect.getsource(cls))
  return source, next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))


def dataclass_comments(cls: type) -> dict[str, str]:
  """Field name -> its description, from the comments in the source of the dataclass `cls`."""
  source, node = _class_source(cls)
  spans = {s.target.id: (s.lineno, s.end_lineno) for s in node.body
           if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
  return field_comments(source, spans)


def training_comments() -> tuple[dict[str, dict[str, str]], dict[str, str]]:
  """(section -> field -> description, section -> intro) from the source of `training_sections`:
  its returned `dict(train=train, ...)` names the variables whose `dict(...)` hold the fields;
  a section's intro is the comment above that variable's assignment."""
  source, tree = _module_source(sections_lib)
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "training_sections")
  returned = next(n for n in ast.walk(fn) if isinstance(n, ast.Return) and isinstance(n.value, ast.Call))
  _, alone = _comments(source)
  comments, intros = {}, {}
  for kw in returned.value.keywords:
    stmt = _assignment(fn.body, kw.value.id)
    comments[kw.arg] = field_comments(source, entry_spans(stmt.value))
    intros[kw.arg] = _join(_above(alone, stmt.lineno))
  return comments, intros


# ---------------------------------------------------------------------------------------------
# Sections


def undocumented(sections: Sequence[Section]) -> list[str]:
  """The fields, as "train.steps", that have no description."""
  return [f"{s.path}.{f.name}" for s in sections for f in s.fields if not f.description.strip()]


def check_documented(sections: Sequence[Section]) -> None:
  missing = undocumented(sections)
  if missing:
    where = sorted({s.source for s in sections for f in s.fields if f"{s.path}.{f.name}" in missing})
    raise UndocumentedFields(f"config fields without a description: {', '.join(missing)}; add a `# ...` comment "
                             f"on or above each in {'; '.join(where)}, then run {REGENERATE}")


def dataclass_section(path: str, cls: type, intro: str = "", extra: Sequence[Field] = ()) -> Section:
  """A section of the fields of the dataclass `cls`, their defaults and comments; `extra` first."""
  comments = dataclass_comments(cls)
  fields = list(extra)
  for f in dataclasses.fields(cls):
    default = (f.default,) if f.default is not dataclasses.MISSING else (
        (f.default_factory(),) if f.default_factory is not dataclasses.MISSING else ())
    fields.append(Field(f.name, default, comments.get(f.name, "")))
  # The docstring's first paragraph (not `cls.__doc__`: dataclasses make one up for a class without).
  doc = (ast.get_docstring(_class_source(cls)[1]) or "").split("\n\n")[0].replace("\n", " ")
  return Section(path, _join([doc, intro]), _where(cls), tuple(fields))


ABSENT = object()  # the default of a key that a stage's section does not have


def training_tables(by_stage: Mapping[int, Mapping[str, Any]], comments: Mapping[str, Mapping[str, str]],
                    intros: Mapping[str, str] | None = None) -> list[Section]:
  """The training sections: by_stage[stage][section] holds the defaults (a ConfigDict or dict),
  `comments[section][field]` the descriptions; a key without one has description ""."""
  stages = tuple(sorted(by_stage))
  values = {s: {name: dict(sec.to_dict() if hasattr(sec, "to_dict") else sec) for name, sec in by_stage[s].items()}
            for s in stages}
  names = list(dict.fromkeys(name for s in stages for name in values[s]))
  out = []
  for name in names:
    documented = comments.get(name, {})
    keys = [k for k in documented if any(k in values[s].get(name, {}) for s in stages)]
    keys += sorted({k for s in stages for k in values[s].get(name, {})} - set(keys))
    fields = tuple(Field(k, tuple(values[s].get(name, {}).get(k, ABSENT) for s in stages), documented.get(k, ""))
                   for k in keys)
    out.append(Section(name, (intros or {}).get(name, ""), "llasm_jax/train/sections.py training_sections", fields, stages))
  return out


def model_sections() -> list[Section]:
  """`config.model` and its parts, from the model dataclasses."""
  model = dataclass_section(
      "model", LlasmConfig,
      "`config.model.preset` picks one of the Model presets and the other keys override its fields: "
      "LlasmConfig fields at the top level, `audio` (WhisperConfig) and `llm` (LlamaConfig, with its "
      "`rope_scaling`) as dicts; `llasm_config` rejects unknown keys. The defaults in these tables are the "
      "dataclasses'; a preset sets its own. With config.train.init_from the architecture is that model "
      "folder's, and of `llm` and `audio` only the run options apply (RUN_OPTIONS in llasm_jax/train/setup.py).",
      extra=[Field("preset", (), PRESET)])
  return [
      model,
      dataclass_section("model.llm", LlamaConfig),
      dataclass_section("model.llm.rope_scaling", RopeScaling),
      dataclass_section("model.audio", WhisperConfig),
  ]


def mesh_sections() -> list[Section]:
  """`config.mesh` (from MESH_AXES) and `config.logical_axis_rules` (from DEFAULT_RULES)."""
  source, tree = _module_source(sharding)
  _, alone = _comments(source)
  sections = []
  mesh_stmt = _assignment(tree.body, "MESH_AXES")
  comments = field_comments(source, entry_spans(mesh_stmt.value))
  shape = sections_lib.from_model_folder(1, "").mesh.shape
  sections.append(Section(
      "mesh", _join(_above(alone, mesh_stmt.lineno) + [
          "The defaults are `from_model_folder`'s (data parallelism over every device); each file in configs/ "
          "sets its own (see Config files)."]),
      "llasm_jax/sharding.py MESH_AXES",
      tuple(Field(f"shape.{axis}", (shape.get(axis, 1),), comments.get(axis, "")) for axis in sharding.MESH_AXES)))
  rules_stmt = _assignment(tree.body, "DEFAULT_RULES")
  comments = field_comments(source, entry_spans(rules_stmt.value))
  sections.append(Section(
      "logical_axis_rules", _join(_above(alone, rules_stmt.lineno) + [
          "config.logical_axis_rules is a tuple of these (logical axis, mesh axes) pairs, set whole; the "
          "defaults are DEFAULT_RULES, which every file in configs/ uses."]),
      "llasm_jax/sharding.py DEFAULT_RULES",
      tuple(Field(name, (axes,), comments.get(name, "")) for name, axes in sharding.DEFAULT_RULES),
      columns=("logical axis", "mesh axes", "what it names")))
  return sections


def reference_sections() -> list[Section]:
  """Every section of a run config, from the code as it is now."""
  comments, intros = training_comments()
  training = training_tables({s: sections_lib.training_sections(s) for s in (1, 2)}, comments, intros)
  return model_sections() + mesh_sections() + training


# ---------------------------------------------------------------------------------------------
# Markdown


_NAMED = [(WHISPER_PRESETS, "WHISPER_PRESETS"), (LLAMA_PRESETS, "LLAMA_PRESETS")]


def _value(v: Any) -> str:
  if isinstance(v, str):
    return json.dumps(v, ensure_ascii=False)
  if isinstance(v, (tuple, list)):
    return "(" + ", ".join(map(_value, v)) + ("," if len(v) == 1 else "") + ")"
  if isinstance(v, dict):
    return "{" + ", ".join(f"{_value(k)}: {_value(x)}" for k, x in v.items()) + "}"
  if dataclasses.is_dataclass(v):
    for presets, table in _NAMED:
      for name, preset in presets.items():
        if preset == v:
          return f"{table}[{_value(name)}]"
    return f"{type(v).__name__}()" if v == type(v)() else repr(v)
  return repr(v)


def _cell(text: str) -> str:
  """`text` for a table cell: "|" escaped everywhere (GFM splits cells on it even in code spans);
  outside code spans also "<" (`<au_patch>` would read as an HTML tag) and "*"."""
  parts = text.replace("|", "\\|").split("`")
  for i in range(0, len(parts), 2):
    parts[i] = parts[i].replace("<", "&lt;").replace("*", "\\*")
  return "`".join(parts)


def _code(v: Any) -> str:
  return "-" if v is ABSENT else "`" + _value(v).replace("|", "\\|") + "`"


def _default(f: Field, stages: Sequence[int]) -> str:
  if not f.defaults:
    return "required"
  if len(set(map(_value, f.defaults))) == 1:
    return _code(f.defaults[0])
  return " / ".join(f"{_code(v)} (stage {s})" for s, v in zip(stages, f.defaults))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _closest(value: Any, presets: Mapping[str, Any]) -> str:
  """"`name`: " for the preset that `value` is, or differs from in a field or two; else ""."""
  names = [f.name for f in dataclasses.fields(value)]
  diffs = {k: [n for n in names if getattr(p, n) != getattr(value, n)] for k, p in presets.items()}
  best = min(diffs, key=lambda k: len(diffs[k]))
  if len(diffs[best]) > 2:
    return ""
  return f"`{best}`" + "".join(f" with {n}={getattr(value, n)}" for n in diffs[best]) + ": "


def _presets_table() -> list[str]:
  source, tree = _module_source(LlasmConfig)
  notes = field_comments(source, entry_spans(_assignment(tree.body, "LLASM_PRESETS").value))
  rows = []
  for name, cfg in LLASM_PRESETS.items():
    llm, audio = cfg.llm, cfg.audio
    llm_text = (f"{_closest(llm, LLAMA_PRESETS)}{llm.num_hidden_layers} layers x {llm.hidden_size}, "
                f"{llm.num_attention_heads} heads ({llm.num_key_value_heads} kv), vocab {llm.vocab_size}")
    layers = (f"{audio.encoder_layers} + {audio.decoder_layers} layers" if cfg.with_decoder
              else f"{audio.encoder_layers} encoder layers")
    audio_text = f"{_closest(audio, WHISPER_PRESETS)}{layers} x {audio.d_model}, {audio.num_mel_bins} mels"
    tokens = (f"{cfg.audio_token_len} per audio" if cfg.with_decoder else
              f"1 per {cfg.stack_factor} encoder frames ({math.ceil(audio.max_source_positions / cfg.stack_factor)} "
              "per 30 s)")
    rows.append([f"`{name}`", f"`{cfg.mode}`", llm_text, audio_text, tokens,
                 _cell(notes.get(name, ""))])
  return _table(["preset", "mode", "LLM", "Whisper", "audio tokens", "note"], rows)


def _configs_table() -> list[str]:
  rows = []
  for path in sorted(CONFIGS.glob("*.py")):
    doc = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip().split("\n")[0]
    run = config_lib.load_config_file(path)
    mesh = " ".join(f"{k}={v}" for k, v in run.mesh.shape.items()) if "mesh" in run else ""
    stage = run.train.stage if "train" in run and "stage" in run.train else "-"
    rows.append([f"`configs/{path.name}`", _cell(doc), f"`{run.model.get('preset')}`", f"`{mesh}`", str(stage)])
  return _table(["file", "what it runs", "model.preset", "mesh.shape", "train stage"], rows)


OVERRIDES = """\
`llasm-jax train --config FILE` takes overrides after its other flags, one key each
(`apply_overrides` in llasm_jax/config.py):

    llasm-jax train --config configs/tiny.py:stage1 --workdir workdir/tiny_stage1 \\
        --config.train.steps=100 --config.data.seq_len=256 --config.mesh.shape.data=2

- The text after `=` is parsed like the key's current value: ints and floats as numbers, a bool as
  `true`/`false`/`1`/`0`, a tuple as a Python literal (`--config.data.buckets='(128, 256, 512)'`),
  anything else (a string, a `None` default) as the text itself.
- Only keys the config already holds can be set: a misspelt key fails and lists the keys there.
  `config.model.llm` and `config.model.audio` hold only the overrides that a file sets, so
  `--config.model.llm.remat_policy=full` works with a file that sets `llm` (such as
  configs/llasm_cllama2_7b.py:stage1); other model fields are set in the file."""


def render(sections: Sequence[Section] | None = None) -> str:
  """The Markdown reference; raises UndocumentedFields if a field has no description."""
  sections = reference_sections() if sections is None else list(sections)
  check_documented(sections)
  lines = [
      "# Run config reference", "",
      f"Generated by `{REGENERATE}`; do not edit.",
      "`--check docs/config_reference.md` exits 1 when it is stale, as tests/test_config_reference.py checks.", "",
      "A run config is an ml_collections file in `configs/` whose `get_config()` returns `model`, `mesh` and "
      "`logical_axis_rules` and, to train, the `train`, `optim`, `data` and `eval` sections of "
      "`training_sections(stage)` (llasm_jax/train/sections.py). Each table below is one section: its keys, their "
      "defaults and what they do, taken from the code and the comments beside each field.", "",
      "## Overrides", "", OVERRIDES, "",
      "## Config files", "", *_configs_table(), "",
      "## Model presets", "", *_presets_table(), "",
  ]
  for s in sections:
    header = list(s.columns)
    if s.stages and any(len(set(map(_value, f.defaults))) > 1 for f in s.fields):
      header[1] = f"{header[1]} (stage {' / stage '.join(map(str, s.stages))} where they differ)"
    lines += [f"## `config.{s.path}`", ""]
    if s.intro:
      lines += [_cell(s.intro), ""]
    lines += [*_table(header, [[f"`{f.name}`", _default(f, s.stages), _cell(f.description)] for f in s.fields]), ""]
  return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llasm_jax.config_reference",
                                   description="The Markdown reference of every run-config field.")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--out", metavar="FILE", help="write it to FILE (default: print it)")
  group.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from what would be generated")
  args = parser.parse_args(argv)
  try:
    text = render()
  except UndocumentedFields as e:
    print(f"config_reference: error: {e}", file=sys.stderr)
    return 2
  if args.check:
    path = pathlib.Path(args.check)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
      print(f"{args.check} is stale (the config code changed); regenerate it: "
            f"python -m llasm_jax.config_reference --out {args.check}", file=sys.stderr)
      return 1
    print(f"{args.check} is up to date")
    return 0
  if args.out:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"written to {args.out}")
    return 0
  sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
