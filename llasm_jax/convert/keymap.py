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

_FIELD = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  path: str
  hook: str | None = None

  def _regex(self, template: str, sep: str) -> re.Pattern:
    out, pos = [], 0
    for m in _FIELD.finditer(template):
      out.append(re.escape(template[pos:m.start()]))
      out.append(rf"(?P<{m.group(1)}>\d+)" if m.group(1) == "layer" else rf"(?P<{m.group(1)}>[^{re.escape(sep)}]+)")
      pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + "$")

  def match_hf(self, name: str) -> dict | None:
    m = self._regex(self.hf, ".").match(name)
    return m.groupdict() if m else None


_LLAMA_LAYER = "model.layers.{layer}"
_LLAMA_PATH = "model/layers/layers"
LLAMA_RULES = [
    Rule("model.embed_tokens.weight", "model/embed_tokens/embedding"),
    Rule(_LLAMA_LAYER + ".self_attn.{proj}.weight", _LLAMA_PATH + "/self_attn/{proj}/kernel@{layer}", "linear"),
    Rule(_LLAMA_LAYER + ".self_attn.{proj}.bias", _LLAMA_PATH + "/self_attn/{proj}/bias@{layer}"),
    Rule(_LLAMA_LAYER + ".mlp.{proj}.weight", _LLAMA_PATH + "/mlp/{proj}/kernel@{layer}", "linear"),
    Rule(_LLAMA_LAYER + ".mlp.{proj}.bias", _LLAMA_PATH + "/mlp/{proj}/bias@{layer}"),
    Rule(_LLAMA_LAYER + ".{norm}.weight", _LLAMA_PATH + "/{norm}/weight@{layer}"),
    Rule("model.norm.weight", "model/norm/weight"),
    Rule("lm_head.weight", "lm_head/kernel", "linear"),
]
LLAMA_IGNORED = [re.compile(r".*rotary_emb\.inv_freq$")]

_W_LAYER = "{part}.layers.{layer}"
_W_PATH = "{part}/layers/layers"
WHISPER_RULES = [
    Rule("encoder.conv{n}.weight", "encoder/conv{n}/kernel", "conv"),
    Rule("encoder.conv{n}.bias", "encoder/conv{n}/bias"),
    Rule("encoder.embed_positions.weight", "encoder/embed_positions"),
    Rule("decoder.embed_tokens.weight", "decoder/embed_tokens/embedding"),
    Rule("decoder.embed_positions.weight", "decoder/embed_positions/embedding"),
    Rule(_W_LAYER + ".{attn}.{proj}.weight", _W_PATH + "/{attn}/{proj}/kernel@{layer}", "linear"),
    Rule(_W_LAYER + ".{attn}.{proj}.bias", _W_PATH + "/{attn}/{proj}/bias@{layer}"),
    Rule(_W_LAYER + ".{fc}.weight", _W_PATH + "/{fc}/kernel@{layer}", "linear"),
    Rule(_W_LAYER + ".{fc}.bias", _W_PATH + "/{fc}/bias@{layer}"),
    Rule(_W_LAYER + ".{norm}.weight", _W_PATH + "/{norm}/scale@{layer}"),
    Rule(_W_LAYER + ".{norm}.bias", _W_PATH + "/{norm}/bias@{layer}"),
    Rule("{part}.layer_norm.weight", "{part}/layer_norm/scale"),
    Rule("{part}.layer_norm.bias", "{part}/layer_norm/bias"),
]
# proj_out is tied to decoder.embed_tokens in every Whisper checkpoint.
WHISPER_IGNORED = [re.compile(r"^proj_out\.weight$")]

ADAPTOR_RULES = [
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
    for rule in self.rules:
      fields = rule.match_hf(name)
      if fields is not None:
        path = rule.path
        layer = fields.pop("layer", None)
        for k, v in fields.items():
          path = path.replace("{" + k + "}", v)
        path = path.split("@")[0]
        return Target(path, None if layer is None else int(layer), rule.hook)
    if any(p.match(name[len(self.hf_prefix):] if name.startswith(self.hf_prefix) else name) for p in self.ignored):
      return None
    raise KeyError(name)

  def hf_names(self, path: str, num_layers: int | None) -> Iterator[tuple[str, int | None, str | None]]:
    """HF names (with layer slot and hook) stored in the parameter at `path`."""
    for rule in self.rules:
      base = rule.path.split("@")[0]
      fields = rule._regex(base, "/").match(path)
      if fields is None:
        continue
      name = rule.hf
      for k, v in fields.groupdict().items():
        name = name.replace("{" + k + "}", v)
      if "{layer}" in name:
        for i in range(num_layers):
          yield name.replace("{layer}", str(i)), i, rule.hook
      else:
        yield name, None, rule.hook
      return
    raise KeyError(path)
