"""Structure facts of the package that any reader can check: imports only run downward through the
layers, and every module stays small enough to read as one thing."""

import ast
import re
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llasm_jax")
MAX_LINES = 460
# Lower layers never import higher ones: the model code knows nothing of data, data nothing of
# training, and only the command line and the demo see everything.
LAYERS = (
    ("errors", "paths", "sharding", "compilation_cache", "layers", "models"),
    ("data", "config", "checkpoint", "tokens", "quantize"),
    ("train", "infer", "convert", "serve"),
    ("cli", "demo", "config_reference", "__main__"),
)


def layer_of(module: str) -> int:
  """'llasm_jax.data.audio' -> its layer (the package itself is the top)."""
  parts = module.split(".")
  if len(parts) == 1:
    return len(LAYERS) - 1
  for level, names in enumerate(LAYERS):
    if parts[1] in names:
      return level
  raise AssertionError(f"{module}: not in any layer of tests/test_structure.py; add it to LAYERS")


def modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__"), path


def imports(path: str):
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.ImportFrom) and node.module == "llasm_jax":  # from llasm_jax import checkpoint
      yield from (f"llasm_jax.{a.name}" for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llasm_jax"):
      yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("llasm_jax"))


def test_the_layering_holds_on_a_module_that_breaks_it():
  assert layer_of("llasm_jax.models.llama") < layer_of("llasm_jax.data.pipeline") < layer_of("llasm_jax.train.trainer")
  with pytest.raises(AssertionError, match="not in any layer"):
    layer_of("llasm_jax.nowhere")


def test_no_module_imports_a_higher_layer():
  upward = [f"{module} imports {target}" for module, path in modules() for target in imports(path)
            if layer_of(target) > layer_of(module)]
  assert not upward, "\n".join(upward)


def test_no_module_is_over_the_line_limit():
  long = {module: n for module, path in modules() if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"


def readme_map() -> list[tuple[int, str, list[str]]]:
  """(layer, folder, modules) of each row of the README's Layout table."""
  readme = open(os.path.join(os.path.dirname(PACKAGE), "README.md"), encoding="utf-8").read()
  section = readme.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
  rows = []
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 3 and cells[0].isdigit():
      folder = cells[1].strip("`")
      rows.append((int(cells[0]), folder, re.findall(r"`([\w/]+\.py)`", cells[2])))
  return rows


def test_the_readme_map_lists_every_module_where_it_is():
  rows = readme_map()
  assert rows, "README.md: no Layout table rows (layer | folder | owns)"
  root = os.path.dirname(PACKAGE)
  listed = set()
  for level, folder, names in rows:
    for name in names:
      path = os.path.join(root, folder, name)
      assert os.path.isfile(path), f"README Layout lists {folder}{name}, which does not exist"
      module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
      assert layer_of(module) == level, f"README Layout puts {module} in layer {level}, tests/test_structure.py in {layer_of(module)}"
      listed.add(module)
  unlisted = sorted(m for m, path in modules() if not path.endswith("__init__.py") and m not in listed)
  assert not unlisted, f"modules missing from the README's Layout table: {unlisted}"
