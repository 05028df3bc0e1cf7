"""LLaSM generation with audio, both modes, against a PyTorch reference greedy loop written here."""

import numpy as np
import pytest
import torch

from llasm_jax.errors import UserError
from llasm_jax.infer import Engine
from tests.models.test_llasm import PATCH, START, END, build, sample_ids, torch_audio_embeds

NEW_TOKENS = 8
# Per prompt: the mel frames of each of its audios (2, 1 and no audio) and the text around them.
FRAMES = {"llasm": [[3000, 3000], [3000], []], "encoder": [[400, 560], [240], []]}
LAYOUTS = [[3, 2, 3], [5, 4], [6]]


def inputs(cfg, mode):
  rng = np.random.RandomState(0)
  mels = [[rng.uniform(-1, 1, (80, f)).astype(np.float32) for f in frames] for frames in FRAMES[mode]]
  prompts = [sample_ids(rng, LAYOUTS[b], [cfg.audio_tokens(f) for f in frames]) for b, frames in enumerate(FRAMES[mode])]
  return prompts, mels


def torch_greedy(llm, prompt, audio_embeds, steps):
  """One prompt, no padding, no cache: splice, then argmax over a full forward per new token."""
  with torch.no_grad():
    embeds = llm.get_input_embeddings()(torch.tensor([prompt])).clone()
    if audio_embeds:
      patches = torch.nonzero(torch.tensor(prompt) == PATCH)[:, 0]
      embeds[0, patches] = torch.cat(audio_embeds)
    out = []
    for _ in range(steps):
      token = int(llm(inputs_embeds=embeds).logits[0, -1].argmax())
      out.append(token)
      embeds = torch.cat([embeds, llm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return out


@pytest.mark.parametrize("mode", ["llasm", "encoder"])
def test_greedy_with_audio_matches_pytorch_reference(mode, tmp_path):
  model, whisper, llm, projector, tensors = build(mode, tmp_path)
  prompts, mels = inputs(model.cfg, mode)
  with torch.no_grad():
    refs = [torch_greedy(llm, p, [torch_audio_embeds(mode, whisper, projector, tensors, m) for m in ms], NEW_TOKENS)
            for p, ms in zip(prompts, mels)]
  engine = Engine(model, eos_ids=[])
  outs, timings = engine.generate(prompts, mels, max_new_tokens=NEW_TOKENS)
  assert [o.token_ids for o in outs] == refs
  assert timings.audio_s > 0 and engine.traces["encode_audio"] == 1  # Whisper once, for all 3 audios
  # Rows in another order: the same executables (one compilation each), each row's own reply.
  order = [2, 0, 1]
  outs, timings = engine.generate([prompts[i] for i in order], [mels[i] for i in order], max_new_tokens=NEW_TOKENS)
  assert [o.token_ids for o in outs] == [refs[i] for i in order]
  assert timings.audio_s == 0  # Whisper ran once per audio: these embeddings were remembered
  assert engine.traces == {"encode_audio": 1, "prefill": 1, "decode": 1}


def test_audio_input_errors(tmp_path):
  model, *_ = build("encoder", tmp_path)
  engine = Engine(model)
  cfg = model.cfg
  mel = np.zeros((80, 400), np.float32)
  p = cfg.audio_tokens(400)
  good = [1, 5, START] + [PATCH] * p + [END]
  with pytest.raises(UserError, match="1 <au_start> markers but 0 audios"):
    engine.generate([good])
  with pytest.raises(UserError, match=f"followed by exactly {p}"):
    engine.generate([good[:-2] + [END]], [[mel]])
  with pytest.raises(UserError, match="mel shape"):
    engine.generate([good], [[np.zeros((128, 400), np.float32)]])
  with pytest.raises(UserError, match="exceed 30 s"):
    engine.generate([good], [[np.zeros((80, 3200), np.float32)]])
  with pytest.raises(UserError, match="1 audio lists for 2 prompts"):
    engine.generate([good, good], [[mel]])
  llasm_model, *_ = build("llasm", tmp_path / "llasm")
  with pytest.raises(UserError, match="padded to 30 s"):
    Engine(llasm_model).generate([[1, START] + [PATCH] * 64 + [END]], [[mel]])
