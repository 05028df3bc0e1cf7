"""Generation on 8 simulated CPU devices (tensor 4 x fsdp 2) gives the tokens of one device; Whisper
transcription there gives transformers' tokens."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
import transformers as tf

from llasm_jax.convert.convert import convert
from llasm_jax.data.audio import synth_speech
from llasm_jax.data.features import log_mel
from tests.infer.test_transcribe import N, hf_generate
from tests.models.test_whisper import randomize_biases, tiny_whisper_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx, traverse_util
    from jax.sharding import PartitionSpec as P
    from llasm_jax import checkpoint, sharding
    from llasm_jax.sharding import DEFAULT_RULES
    from llasm_jax.infer import Engine, SamplingParams
    from llasm_jax.infer.generator import Generator

    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    rng = np.random.RandomState(0)
    for folder in sys.argv[1:]:
        gen = Generator.load(folder, mesh=mesh, rules=DEFAULT_RULES)  # restored into its shards
        sharded, meta = gen.engine.model, checkpoint.read_meta(folder)
        single, _ = checkpoint.load_model(folder)
        llm = sharded.llm if meta["kind"] == "llasm" else sharded
        q = llm.model.layers.layers.self_attn.q_proj.kernel[...]
        assert q.sharding.spec == P(None, "fsdp", "tensor"), q.sharding.spec
        prompts = [[1] + rng.randint(3, 90, n).tolist() for n in (4, 11, 7)]  # 3 rows: padded to 4
        mels = None
        if meta["kind"] == "llasm":
            cfg = sharded.cfg
            frames = [[300, 160], [], [240]]
            mels = [[rng.uniform(-1, 1, (80, f)).astype(np.float32) for f in fs] for fs in frames]
            for p, fs in zip(prompts, frames):
                for f in fs:
                    p += [cfg.audio_start_id] + [cfg.audio_patch_id] * cfg.audio_tokens(f) + [cfg.audio_end_id, 5]
        engines = [Engine(single, eos_ids=gen.engine.eos_ids), gen.engine]
        samplings = [SamplingParams()]
        if meta["kind"] == "llama":  # the sampler is the same code after any prefill
            samplings.append(SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1))
        for sampling in samplings:
            ref, out = [[o.token_ids for o in e.generate(prompts, mels, max_new_tokens=10, sampling=sampling)[0]]
                        for e in engines]
            assert out == ref, (folder, sampling, out, ref)
            # The streamed path (one decode call per token) runs the same sharded executable.
            streamed = engines[1].generate(prompts, mels, max_new_tokens=10, sampling=sampling,
                                           callback=lambda rows: None)[0]
            assert [o.token_ids for o in streamed] == ref
        assert engines[1].traces["decode"] == len(samplings), engines[1].traces
        # The API on top: same tokens (the prompts are token ids, the audios mel features).
        api = gen.generate(prompts, mels, max_new_tokens=10, temperature=sampling.temperature, top_k=sampling.top_k,
                           top_p=sampling.top_p, seed=sampling.seed)  # the last sampling of the loop
        assert [r.token_ids for r in api] == ref
        if mels is not None:  # text only on the same engine: the prefill without audio inputs
            text = [[1, 5, 6, 7, 8], [1, 9]]
            ref, out = [[o.token_ids for o in e.generate(text, max_new_tokens=10)[0]] for e in engines]
            assert out == ref, (out, ref)
        print("OK", meta["kind"], ref[1])

    if os.environ.get("TRANSCRIBE"):  # one process start for both checks
        import json
        from llasm_jax.data.audio import synth_speech
        from llasm_jax.data.features import log_mel
        from llasm_jax.infer.transcribe import Transcriber
        want = json.loads(os.environ["TRANSCRIBE_WANT"])
        tr = Transcriber.load(os.environ["TRANSCRIBE"], mesh=mesh, rules=DEFAULT_RULES)
        fc1 = tr.model.decoder.layers.layers.fc1.kernel[...]
        assert fc1.sharding.spec == P(None, "fsdp", "tensor"), fc1.sharding.spec
        mels = [log_mel(synth_speech(s, seed=i)) for i, s in enumerate(want["seconds"])]
        ids, langs = tr.generate_ids(mels, max_new_tokens=want["n"])  # 3 rows padded to 4, languages detected
        assert [ids, langs] == [want["ids"], want["langs"]], (ids, langs, want)
        print("OK transcribe")
""")


def test_sharded_generation_equals_single_device(tmp_path, whisper):
  # Heads (4), kv heads (4), MLP (128) and vocab (96) divide over tensor=4; the LLaSM vocab of
  # 99 does not, so its embedding rows stay whole on that axis while the rest is split.
  llm = tf.LlamaForCausalLM(tf.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=4, initializer_range=0.1))
  llm.save_pretrained(tmp_path / "llm")
  hf_whisper = tf.WhisperModel(tiny_whisper_config())
  randomize_biases(hf_whisper)
  hf_whisper.save_pretrained(tmp_path / "whisper")
  convert(str(tmp_path / "llm"), out=str(tmp_path / "llama_ck"), progress=False)
  convert(str(tmp_path / "llm"), str(tmp_path / "whisper"), out=str(tmp_path / "llasm_ck"), mode="encoder",
          progress=False)
  # Transcription: the tiny multilingual Whisper's greedy tokens and languages in transformers.
  model, _, root = whisper
  seconds = (1.0, 2.5, 4.0)
  audios = [synth_speech(s, seed=i) for i, s in enumerate(seconds)]
  with torch.no_grad():
    langs = model.detect_language(torch.tensor(np.stack([log_mel(a) for a in audios]))).tolist()
  want = dict(seconds=seconds, n=N, ids=hf_generate(model, audios, task="transcribe"), langs=langs)
  script = tmp_path / "sharded.py"
  script.write_text(SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TRANSCRIBE=str(root / "ck"),
             TRANSCRIBE_WANT=json.dumps(want))
  res = subprocess.run([sys.executable, str(script), str(tmp_path / "llama_ck"), str(tmp_path / "llasm_ck")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  assert "OK llama" in res.stdout and "OK llasm" in res.stdout and "OK transcribe" in res.stdout, res.stdout
