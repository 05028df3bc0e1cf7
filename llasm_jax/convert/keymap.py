"""Per-family key maps between Hugging Face tensor names and llasm_jax parameter paths.

A rule pairs an HF name template with a parameter path template; `{layer}` is a layer index
(the parameter holds all layers stacked on axis 0), other `{fields}` are copied across. A hook
says how the array changes on the way: "linear" (torch [out, in] <-> [in, out]) or "conv"
(torch [out, in, width] <-> [width, in, out]). Both directions use the same table.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

_FIELD = re.compile(r"\{(\w+)(?::([\w|]+))?\}")


def _fill(template: str, fields: dict[str, str]) -> str:
  return _FIELD.sub(lambda m: fields.get(m.group(1), m.group(0)), template)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  path: str
  hook: str | None = None

  def _regex(self, template: str, sep: str) -> re.Pattern:
    out, pos = [], 0
    for m in _FIELD.finditer(template):
      out.append(re.escape(template[pos:m.start()]))
      if m.group(1) == "layer":
        pattern = r"\d+"
      else:
        pattern = m.group(2) or rf"[^{re.escape(sep)}]+"
      out.append(rf"(?P<{m.group(1)}>{pattern})")
      pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + "$")

  def match_hf(self, name: str) -> dict | None:
    m = self._regex(self.hf, ".").match(name)
    return m.groupdict() if m else None


_L_LAYER = "model.layers.{layer}"
_L_PATH = "model/layers/layers"
_L_ATTN = "self_attn.{proj:q_proj|k_proj|v_proj|o_proj}"
_L_MLP = "mlp.{proj:gate_proj|up_proj|down_proj}"
_L_NORM = "{norm:input_layernorm|post_attention_layernorm}"


def _slash(t: str) -> str:
  return t.replace(".", "/")


LLAMA_RULES = [
    Rule("model.embed_tokens.weight", "model/embed_tokens/embedding"),
    Rule(f"{_L_LAYER}.{_L_ATTN}.weight", f"{_L_PATH}/{_slash(_L_ATTN)}/kernel@{{layer}}", "linear"),
    Rule(f"{_L_LAYER}.{_L_ATTN}.bias", f"{_L_PATH}/{_slash(_L_ATTN)}/bias@{{layer}}"),
    Rule(f"{_L_LAYER}.{_L_MLP}.weight", f"{_L_PATH}/{_slash(_L_MLP)}/kernel@{{layer}}", "linear"),
    Rule(f"{_L_LAYER}.{_L_MLP}.bias", f"{_L_PATH}/{_slash(_L_MLP)}/bias@{{layer}}"),
    Rule(f"{_L_LAYER}.{_L_NORM}.weight", f"{_L_PATH}/{_L_NORM}/weight@{{layer}}"),
    Rule("model.norm.weight", "model/norm/weight"),
    Rule("lm_head.weight", "lm_head/kernel", "linear"),
]
LLAMA_IGNORED = [re.compile(r".*rotary_emb\.inv_freq$")]

_W_LAYER = "{part:encoder|decoder}.layers.{layer}"
_W_PATH = "{part:encoder|decoder}/layers/layers"
_ATTN = "{attn:self_attn|encoder_attn}.{proj:q_proj|k_proj|v_proj|out_proj}"
_FC = "{fc:fc1|fc2}"
_NORM = "{norm:self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm}"
WHISPER_RULES = [
    Rule("encoder.conv{n:1|2}.weight", "encoder/conv{n:1|2}/kernel", "conv"),
    Rule("encoder.conv{n:1|2}.bias", "encoder/conv{n:1|2}/bias"),
    Rule("encoder.embed_positions.weight", "encoder/embed_positions"),
    Rule("decoder.embed_tokens.weight", "decoder/embed_tokens/embedding"),
    Rule("decoder.embed_positions.weight", "decoder/embed_positions/embedding"),
    Rule(f"{_W_LAYER}.{_ATTN}.weight", f"{_W_PATH}/{_slash(_ATTN)}/kernel@{{layer}}", "linear"),
    Rule(f"{_W_LAYER}.{_ATTN}.bias", f"{_W_PATH}/{_slash(_ATTN)}/bias@{{layer}}"),
    Rule(f"{_W_LAYER}.{_FC}.weight", f"{_W_PATH}/{_FC}/kernel@{{layer}}", "linear"),
    Rule(f"{_W_LAYER}.{_FC}.bias", f"{_W_PATH}/{_FC}/bias@{{layer}}"),
    Rule(f"{_W_LAYER}.{_NORM}.weight", f"{_W_PATH}/{_NORM}/scale@{{layer}}"),
    Rule(f"{_W_LAYER}.{_NORM}.bias", f"{_W_PATH}/{_NORM}/bias@{{layer}}"),
    Rule("{part:encoder|decoder}.layer_norm.weight", "{part:encoder|decoder}/layer_norm/scale"),
    Rule("{part:encoder|decoder}.layer_norm.bias", "{part:encoder|decoder}/layer_norm/bias"),
]
# proj_out is tied to decoder.embed_tokens in every Whisper checkpoint.
WHISPER_IGNORED = [re.compile(r"^proj_out\.weight$")]

LINEAR_ADAPTOR_RULES = [
    Rule("model.mm_projector.weight", "mm_projector/kernel", "linear"),
    Rule("model.mm_projector.bias", "mm_projector/bias"),
]


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one HF tensor goes: parameter `path` (slash-joined), `layer` slot or None, hook."""

  path: str
  layer: int | None
  hook: str | None


def to_jax_layout(x: np.ndarray, hook: str | None) -> np.ndarray:
  if hook == "linear":
    return x.T
  if hook == "conv":
    return np.transpose(x, (2, 1, 0))
  return x


to_hf_layout = to_jax_layout  # both hooks are their own inverse


class KeyMap:
  """A family's rules under a parameter prefix (e.g. "llm/", "audio/", "adaptor/")."""

  def __init__(self, rules: list[Rule], prefix: str = "", ignored=(), hf_prefix: str = ""):
    self.rules = [Rule(hf_prefix + r.hf, prefix + r.path, r.hook) for r in rules]
    self.ignored = list(ignored)
    self.hf_prefix = hf_prefix

  def target(self, name: str) -> Target | None:
    """The parameter an HF tensor name maps to; None if the name is known to be ignorable."""
    bare = name[len(self.hf_prefix):] if name.startswith(self.hf_prefix) else name
    if any(p.match(bare) for p in self.ignored):
      return None
    for rule in self.rules:
      fields = rule.match_hf(name)
      if fields is not None:
        layer = fields.pop("layer", None)
        path = _fill(rule.path.split("@")[0], fields)
        return Target(path, None if layer is None else int(layer), rule.hook)
    raise KeyError(name)

  def hf_names(self, path: str, num_layers: int | None) -> Iterator[tuple[str, int | None, str | None]]:
    """HF names (with layer slot and hook) stored in the parameter at `path`."""
    for rule in self.rules:
      base = rule.path.split("@")[0]
      fields = rule._regex(base, "/").match(path)
      if fields is None:
        continue
      name = _fill(rule.hf, fields.groupdict())
      if "{layer}" in name:
        for i in range(num_layers):
          yield _fill(name, {"layer": str(i)}), i, rule.hook
      else:
        yield name, None, rule.hook
      return
    raise KeyError(path)

# "encoder" mode is ours: its adaptor is stored under a name of our choosing, `model.audio_adaptor.`
# followed by the module names. Both of its projectors are covered: the MLP (linear_1, linear_2 with
# biases) and the Ultravox one, whose names are Ultravox's own (ln_pre, linear_1, linear_2, ln_post;
# no biases). A tensor of the other projector maps to a parameter the config lacks and is refused.
MLP_ADAPTOR_RULES = [
    Rule("model.audio_adaptor.{n:linear_1|linear_2}.weight", "{n:linear_1|linear_2}/kernel", "linear"),
    Rule("model.audio_adaptor.{n:linear_1|linear_2}.bias", "{n:linear_1|linear_2}/bias"),
    Rule("model.audio_adaptor.{n:ln_pre|ln_post}.weight", "{n:ln_pre|ln_post}/weight"),
]
