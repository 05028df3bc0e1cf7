"""Decode slots on 8 simulated CPU devices (data 2 x fsdp 2 x tensor 2) give the tokens of one device."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    from llasm_jax import sharding
    from llasm_jax.infer.batching import SlotEngine, SlotRequest
    from llasm_jax.infer.generator import Generator
    from llasm_jax.infer.sampling import SamplingParams

    folder, wav = sys.argv[1:]
    out = {}
    for name, mesh in (("one", None), ("mesh", sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))):
        gen = Generator.load(folder, mesh=mesh, rules=None if mesh is None else sharding.DEFAULT_RULES)
        e = gen.engine
        slots = SlotEngine(e.model, slots=4, max_len=512, chunk=3, mesh=e.mesh, rules=e.rules, eos_ids=e.eos_ids,
                           pad_id=e.pad_id)
        slots.set_prefix(gen.template().fixed_prefix())
        prompts = [gen.prepare("hello world"), gen.prepare("what is said in this audio?", [wav]),
                   gen.prepare("the quick brown fox")]
        got = {i: [] for i in range(4)}
        sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=3)
        first = slots.insert([SlotRequest(slot=2, prompt_ids=prompts[0][0], max_new_tokens=10)])
        got[2] += first
        for step in range(5):
            if step == 1:  # two more join while slot 2 decodes
                first = slots.insert([SlotRequest(slot=0, prompt_ids=prompts[1][0], mels=prompts[1][1], max_new_tokens=10),
                                      SlotRequest(slot=3, prompt_ids=prompts[2][0], max_new_tokens=10, sampling=sampled)])
                got[0] += first[:1]
                got[3] += first[1:]
            s = slots.step()
            for b in range(4):
                got[b] += [int(t) for t, e_ in zip(s.tokens[b], s.emitted[b]) if e_]
        out[name] = got
    print("RESULT", json.dumps(out))
""")


def test_slots_on_a_mesh_equal_one_device(ckpts):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", SCRIPT, ckpts["llasm"], ckpts["wav"]], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert result["one"] == result["mesh"]
  assert all(len(result["one"][str(b)]) >= 2 for b in (0, 2, 3))
