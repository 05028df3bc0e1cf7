"""The modern-LLM presets equal what `convert` reads from the published config.json files (the
values of the Hugging Face hub folders, written out here: tests need no network), and the LLaSM
presets put the audio tokens where `convert` would."""

import dataclasses

from llasm_jax.convert.configs import llama_config_from_hf, whisper_config_from_hf
from llasm_jax.models.llama import LLAMA_PRESETS
from llasm_jax.models.llasm import LLASM_PRESETS
from llasm_jax.models.whisper import WHISPER_PRESETS

# meta-llama/Llama-3.1-8B config.json (the -Instruct one differs in eos_token_id: [128001, 128008, 128009]).
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256}
# Qwen/Qwen2.5-7B config.json.
QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 152064}
# openai/whisper-large-v3 config.json (the fields llasm_jax reads).
WHISPER_LARGE_V3 = {
    "model_type": "whisper", "activation_function": "gelu", "num_mel_bins": 128, "d_model": 1280,
    "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_layers": 32,
    "decoder_attention_heads": 20, "decoder_ffn_dim": 5120, "vocab_size": 51866, "max_source_positions": 1500,
    "max_target_positions": 448, "scale_embedding": False, "decoder_start_token_id": 50258}


def test_presets_equal_the_published_configs():
  assert LLAMA_PRESETS["llama3_1_8b"] == llama_config_from_hf(LLAMA_3_1_8B)
  assert LLAMA_PRESETS["qwen2_5_7b"] == llama_config_from_hf(QWEN2_5_7B)
  assert WHISPER_PRESETS["whisper_large_v3"] == whisper_config_from_hf(WHISPER_LARGE_V3)
  # With the three audio tokens appended, as `convert --llm BASE` grows a vocab that has no room.
  assert LLAMA_PRESETS["llama3_1_8b_llasm"] == llama_config_from_hf({**LLAMA_3_1_8B, "vocab_size": 128259})
  qwen = LLAMA_PRESETS["qwen2_5_7b"]
  assert qwen.qkv_bias and not qwen.o_bias and qwen.kv_head_dim == 128


def test_llasm_presets_pair_them_in_encoder_mode():
  for name, llm, tokenizer_len in (("llasm_llama3_1_8b_encoder", "llama3_1_8b_llasm", 128256),
                                   ("llasm_qwen2_5_7b_encoder", "qwen2_5_7b", 151665)):
    cfg = LLASM_PRESETS[name]
    assert cfg.mode == "encoder" and cfg.audio == WHISPER_PRESETS["whisper_large_v3"] and cfg.llm == LLAMA_PRESETS[llm]
    # `convert` adds <au_patch>, <au_start>, <au_end> to the tokenizer: its next ids.
    assert (cfg.audio_patch_id, cfg.audio_start_id, cfg.audio_end_id) == tuple(range(tokenizer_len, tokenizer_len + 3))
    assert cfg.llm.vocab_size == max(LLAMA_PRESETS[llm].vocab_size, tokenizer_len + 3)
    assert cfg.audio_tokens(3000) == 188  # 30 s: 1500 encoder frames, 8 per token
    assert dataclasses.replace(cfg.llm, vocab_multiple=128).padded_vocab % 128 == 0
