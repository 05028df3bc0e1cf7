"""The run-config loader (`FILE.py:ARG`, ml_collections' convention) and every branch of the `--config.key=value` parser."""

import pathlib

import ml_collections
import pytest

from llasm_jax.config import apply_overrides, config_name, load_config_file
from llasm_jax.errors import UserError
from llasm_jax.train.sections import training_sections

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_config() -> ml_collections.ConfigDict:
  """A config holding one field of each kind the parser types by."""
  return ml_collections.ConfigDict({
      "train": {"steps": 10, "lr": 1e-3, "packing": False, "trainable": ("adaptor/.*",), "buckets": (),
                "system": None, "template": "llasm-cllama2"}})


# ---- the loader


def test_the_argument_selects_the_stage_and_stage1_is_the_default():
  default, one, two = (load_config_file(ROOT / "configs" / f"tiny.py{arg}") for arg in ("", ":stage1", ":stage2"))
  assert default.train.stage == one.train.stage == 1 and two.train.stage == 2
  assert default.to_dict() == one.to_dict()
  assert two.train.trainable == training_sections(2)["train"].trainable
  assert two.optim.lr == training_sections(2)["optim"].lr and two.data.seq_len == one.data.seq_len == 48


def test_7b_stages_differ_in_the_settings_the_two_files_had():
  one, two = (load_config_file(f"configs/llasm_cllama2_7b.py:stage{s}") for s in (1, 2))
  assert (one.model.llm.remat_policy, two.model.llm.remat_policy) == ("dots_no_batch", "full")
  assert (one.train.steps, one.train.batch_size, one.data.seq_len) == (20000, 256, 256)
  assert (two.train.steps, two.train.batch_size, two.data.seq_len) == (30000, 128, 2048)
  llama = load_config_file("configs/llasm_llama3_1_8b.py:stage2")
  assert llama.train.loss_chunk == 256 and llama.data.template == "chat-template"
  assert load_config_file("configs/llasm_qwen2_5_7b.py").train.loss_chunk == 0


def test_a_relative_path_is_found_from_anywhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert load_config_file("configs/tiny.py:stage2").train.stage == 2
  assert load_config_file("configs/tiny_encoder.py").model.preset == "tiny_encoder"


def test_loader_errors(tmp_path):
  with pytest.raises(UserError, match="'stage3': expected stage1 or stage2"):
    load_config_file("configs/tiny.py:stage3")
  with pytest.raises(UserError, match="takes no argument"):
    load_config_file("configs/tiny_encoder.py:stage1")
  with pytest.raises(FileNotFoundError, match="'configs/nope.py' not found"):
    load_config_file("configs/nope.py:stage1")
  bare = tmp_path / "bare.py"
  bare.write_text("X = 1\n")
  with pytest.raises(UserError, match="has no get_config"):
    load_config_file(bare)


def test_config_name():
  assert config_name("configs/tiny.py:stage2") == "tiny_stage2"
  assert config_name("configs/tiny.py") == "tiny"
  assert config_name(ROOT / "configs" / "llasm_cllama2_7b.py") == "llasm_cllama2_7b"


# ---- the overrides, one test per branch of the parser


@pytest.mark.parametrize("item", ["config.train.steps=3", "--config.train.steps", "--train.steps=3"])
def test_an_override_must_look_like_one(item):
  with pytest.raises(UserError, match="overrides look like --config.train.steps=100"):
    apply_overrides(run_config(), [item])


def test_unknown_section_and_key():
  with pytest.raises(UserError, match="config has no section 'trian'"):
    apply_overrides(run_config(), ["--config.trian.steps=3"])
  with pytest.raises(UserError, match="unknown key 'step'; keys here: buckets, lr, packing"):
    apply_overrides(run_config(), ["--config.train.step=3"])


@pytest.mark.parametrize("raw, want", [("true", True), ("False", False), ("1", True), ("0", False)])
def test_bool(raw, want):
  run = run_config()
  apply_overrides(run, [f"--config.train.packing={raw}"])
  assert run.train.packing is want


def test_bool_rejects_other_text():
  with pytest.raises(UserError, match="expected true or false"):
    apply_overrides(run_config(), ["--config.train.packing=yes"])


@pytest.mark.parametrize("raw, want", [("7", 7), ("7.0", 7), ("1e3", 1000)])
def test_int(raw, want):
  run = run_config()
  apply_overrides(run, [f"--config.train.steps={raw}"])
  assert run.train.steps == want and type(run.train.steps) is int


@pytest.mark.parametrize("raw", ["2.5", "many"])
def test_int_rejects_fractions_and_text(raw):
  with pytest.raises(UserError, match="expected a int"):
    apply_overrides(run_config(), [f"--config.train.steps={raw}"])


def test_float():
  run = run_config()
  apply_overrides(run, ["--config.train.lr=3e-4"])
  assert run.train.lr == 3e-4
  apply_overrides(run, ["--config.train.lr=2"])
  assert run.train.lr == 2.0 and type(run.train.lr) is float
  with pytest.raises(UserError, match="expected a float"):
    apply_overrides(run, ["--config.train.lr=fast"])


@pytest.mark.parametrize("key, raw, want", [
    ("trainable", "adaptor/.*,llm/.*", ("adaptor/.*", "llm/.*")),  # bare text: split at commas
    ("trainable", "'llm/.{1,2}'", ("llm/.{1,2}",)),  # one string literal
    ("trainable", '("a", "b")', ("a", "b")),  # a tuple literal
    ("trainable", '["a"]', ("a",)),  # a list literal
    ("buckets", "(128, 256)", (128, 256)),  # an empty default takes any literal
    ("buckets", "512", (512,)),  # one value that is not a sequence
])
def test_tuple(key, raw, want):
  run = run_config()
  apply_overrides(run, [f"--config.train.{key}={raw}"])
  assert run.train[key] == want


def test_tuple_of_strings_rejects_numbers():
  with pytest.raises(UserError, match="expected strings"):
    apply_overrides(run_config(), ["--config.train.trainable=(1, 2)"])


def test_none_default_and_text():
  run = run_config()
  apply_overrides(run, ["--config.train.system=None"])
  assert run.train.system is None
  apply_overrides(run, ["--config.train.system=You are brief.", "--config.train.template=chat-template"])
  assert run.train.system == "You are brief." and run.train.template == "chat-template"
