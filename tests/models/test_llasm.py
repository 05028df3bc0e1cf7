"""The LLaSM composite against a PyTorch reference of the same forward, written here."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from llasm_jax.convert.configs import llama_config_from_hf, whisper_config_from_hf
from llasm_jax.convert.hf import export_tensors, keymaps, load_tensors, whisper_name
from llasm_jax.errors import UserError
from llasm_jax.models.llasm import Llasm, LlasmConfig, check_audio_markers
from tests.conftest import assert_close, hf_tensors
from tests.models.test_whisper import randomize_biases, tiny_whisper_config

TOL = 1e-4
VOCAB, PATCH, START, END = 100, 97, 98, 99


def build(mode, tmp_path):
  whisper = tf.WhisperModel(tiny_whisper_config()).eval()
  randomize_biases(whisper)
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2)).eval()
  cfg = LlasmConfig(
      audio=whisper_config_from_hf(whisper.config.to_dict()), llm=llama_config_from_hf(llm.config.to_dict()),
      mode=mode, audio_token_len=64, stack_factor=4, audio_patch_id=PATCH, audio_start_id=START,
      audio_end_id=END)
  model = Llasm(cfg, rngs=nnx.Rngs(0))
  projector = torch.nn.Linear(64, 48)
  torch.nn.init.normal_(projector.bias, 0, 0.1)
  tensors = dict(hf_tensors(llm, tmp_path / "llm"))
  if mode == "llasm":  # the released layout: the adaptor inside the LLM checkpoint
    tensors["model.mm_projector.weight"] = projector.weight.detach().numpy()
    tensors["model.mm_projector.bias"] = projector.bias.detach().numpy()
  else:  # our MLP adaptor keeps its random init; the reference copies it
    tensors.update({k: v for k, v in export_tensors(model, keymaps("llasm", mode)).items() if "audio_adaptor" in k})
  whisper_tensors = ((whisper_name(k), v) for k, v in hf_tensors(whisper, tmp_path / "whisper").items())
  load_tensors(model, itertools.chain(tensors.items(), whisper_tensors), keymaps("llasm", mode))
  return model, whisper, llm, projector, tensors


def sample_ids(rng, layout, counts):
  """layout: text lengths around the audios; counts: audio tokens of each audio."""
  ids = [1]
  for i, n_text in enumerate(layout):
    ids += rng.randint(3, PATCH, n_text).tolist()
    if i < len(counts):
      ids += [START] + [PATCH] * counts[i] + [END]
  return ids


def batch(cfg, mel_frames_per_sample, pad_to):
  """Two samples with different numbers of audios, right-padded text, empty slots zeroed."""
  rng = np.random.RandomState(0)
  slots = max(len(m) for m in mel_frames_per_sample)
  layouts = [[3, 2, 3], [5, 4]]
  ids, mels, lengths = [], np.zeros((2, slots, 80, pad_to), np.float32), np.zeros((2, slots), np.int32)
  for b, frames in enumerate(mel_frames_per_sample):
    ids.append(sample_ids(rng, layouts[b], [cfg.audio_tokens(f) for f in frames]))
    for a, f in enumerate(frames):
      mels[b, a, :, :f] = rng.uniform(-1, 1, (80, f))
      lengths[b, a] = f
  t = max(map(len, ids))
  mask = np.array([[1] * len(i) + [0] * (t - len(i)) for i in ids])
  ids = np.array([i + [0] * (t - len(i)) for i in ids])
  return ids, mels, lengths, mask


def torch_audio_embeds(mode, whisper, projector, tensors, mel):
  """The PyTorch audio path for one mel float[80, F]: (decoder queries +) adaptor -> float[P, 48]."""
  if mode == "llasm":
    start = torch.full((1, 64), whisper.config.decoder_start_token_id)
    return projector(whisper(input_features=torch.tensor(mel[None]), decoder_input_ids=start).last_hidden_state[0])
  # HF Whisper only takes 30 s: same weights, max_source_positions = frames / 2.
  short = tf.WhisperModel(tiny_whisper_config(max_source_positions=mel.shape[-1] // 2)).eval()
  state = dict(whisper.state_dict())
  state["encoder.embed_positions.weight"] = state["encoder.embed_positions.weight"][:mel.shape[-1] // 2]
  short.load_state_dict(state)
  states = short.encoder(torch.tensor(mel[None])).last_hidden_state[0]
  states = torch.nn.functional.pad(states, (0, 0, 0, -states.shape[0] % 4)).reshape(-1, 4 * 64)
  lin1, lin2 = torch.nn.Linear(4 * 64, 48), torch.nn.Linear(48, 48)
  for name, lin in (("linear_1", lin1), ("linear_2", lin2)):
    lin.weight.data = torch.tensor(tensors[f"model.audio_adaptor.{name}.weight"])
    lin.bias.data = torch.tensor(tensors[f"model.audio_adaptor.{name}.bias"])
  return lin2(torch.nn.functional.gelu(lin1(states)))


def torch_reference(llm, audio_embeds, ids, mask):
  """Splices per-sample audio embeddings (lists of [P, D]) over the patch tokens, runs the LLM."""
  with torch.no_grad():
    embeds = llm.get_input_embeddings()(torch.tensor(ids)).clone()
    for b, per_audio in enumerate(audio_embeds):
      patches = torch.nonzero(torch.tensor(ids[b]) == PATCH)[:, 0]
      embeds[b, patches] = torch.cat(per_audio)
    return llm(inputs_embeds=embeds, attention_mask=torch.tensor(mask)).logits.numpy()


def test_llasm_mode_matches_pytorch_reference(tmp_path):
  model, whisper, llm, projector, _ = build("llasm", tmp_path)
  ids, mels, lengths, mask = batch(model.cfg, [[3000, 3000], [3000]], 3000)
  check_audio_markers(model.cfg, ids, np.where(lengths > 0, 64, 0))
  with torch.no_grad():
    audio = [[torch_audio_embeds("llasm", whisper, projector, {}, mels[b, a])
              for a in range(int((lengths[b] > 0).sum()))] for b in range(2)]
  ref = torch_reference(llm, audio, ids, mask)
  out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mels), jnp.asarray(lengths),
                         attention_mask=jnp.asarray(mask))[0])
  valid = mask == 1
  assert_close(out[valid], ref[valid], atol=TOL)


def test_encoder_mode_matches_pytorch_reference(tmp_path):
  model, whisper, llm, _, tensors = build("encoder", tmp_path)
  frames = [[400, 560], [240]]
  ids, mels, lengths, mask = batch(model.cfg, frames, 600)
  check_audio_markers(model.cfg, ids, [[model.cfg.audio_tokens(f) for f in s] + [0] * (2 - len(s)) for s in frames])
  with torch.no_grad():
    audio = [[torch_audio_embeds("encoder", whisper, None, tensors, mels[b, a, :, :f]) for a, f in enumerate(fs)]
             for b, fs in enumerate(frames)]
  ref = torch_reference(llm, audio, ids, mask)
  out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mels), jnp.asarray(lengths),
                         attention_mask=jnp.asarray(mask))[0])
  valid = mask == 1
  assert_close(out[valid], ref[valid], atol=TOL)


CFG = LlasmConfig(
    audio=whisper_config_from_hf(tiny_whisper_config().to_dict()),
    llm=llama_config_from_hf(dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2)),
    audio_token_len=3, audio_patch_id=PATCH, audio_start_id=START, audio_end_id=END)
GOOD = [1, 5, START, PATCH, PATCH, PATCH, END, 6, START, PATCH, PATCH, PATCH, END, 7]


@pytest.mark.parametrize("ids, counts, message", [
    ([1, 5, START, PATCH, PATCH, PATCH, 6], [[3]], "followed by exactly 3"),  # start without end
    ([1, START, PATCH, PATCH, END, 6], [[3]], "followed by exactly 3"),  # too few patches
    ([1, START, PATCH, PATCH, PATCH, PATCH, END], [[3]], "followed by exactly 3"),  # too many
    (GOOD, [[3, 0]], "2 <au_start> markers but 1 audios"),  # more markers than audios
    ([1, 5, START, PATCH, PATCH, PATCH, END, 6], [[3, 3]], "1 <au_start> markers but 2 audios"),
    ([1, PATCH, 5], [[0]], "outside any"),  # stray patch
    ([1, 5, END], [[0]], "1 <au_end> markers but 0"),
    (GOOD, [[0, 3]], "empty slot before a filled one"),
])
def test_malformed_audio_markers_are_clear_errors(ids, counts, message):
  with pytest.raises(UserError, match=message):
    check_audio_markers(CFG, np.array([ids]), np.array(counts))


def test_well_formed_markers_pass():
  check_audio_markers(CFG, np.array([GOOD]), np.array([[3, 3]]))
