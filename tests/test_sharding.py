"""Sharded steps on 8 emulated CPU devices give the numbers of a 1-device run.

Each configuration runs in its own process, since the device count is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


RUNS = {  # name: (mode, fsdp, dropout)
    "jit data-parallel": ("jit", 1, 0.1), "jit fsdp=2": ("jit", 2, 0.1), "jit fsdp=8": ("jit", 8, 0.1),
    # pmap draws dropout per device, so it matches the 1-device run only without dropout.
    "pmap": ("pmap", 1, 0.0)}


def run_steps(teacher, corpus, runs, out):
  """3 training steps per run; saves losses and final params of each to `out` (.npz)."""
  sys.path.insert(0, HERE)
  import jax
  from conftest import tiny_config
  from minilm_jax import hf, sharding, train
  from test_train import batches
  sharding._MIN_FSDP_SIZE = 0  # the tiny model has no large tensors: shard every divisible one
  saved = {"devices": jax.device_count()}
  for name, (mode, fsdp, dropout) in runs.items():
    cfg = tiny_config(teacher, corpus, **{"parallel.mode": mode, "parallel.fsdp": fsdp,
                                          "student.dropout": dropout, "student.num_layers": 2})
    s = train.setup(cfg)
    state = s.init_state()
    losses = []
    for b in batches(cfg, teacher, 3):
      state, m = s.step(state, s.teacher_params, sharding.put_batch(s.mesh, b))
      losses.append(float(m["loss"]))
    saved[f"{name}|losses"] = np.array(losses)
    for k, v in hf.flatten(state.params):
      saved[f"{name}|{'/'.join(k)}"] = np.asarray(jax.device_get(v))
      saved[f"{name}|spec|{'/'.join(k)}"] = str(getattr(v.sharding, "spec", ""))
  np.savez(out, **saved)


def fsdp_collectives(teacher, corpus, out):
  """The collectives of the compiled fsdp=4 step (8 devices: 2 data x 4 fsdp), bf16, and the shapes
  of the student's and the teacher's parameters, as JSON."""
  import jax
  import jax.numpy as jnp
  from minilm_jax import hlo, sharding, train
  sys.path.insert(0, HERE)
  from conftest import tiny_config
  sharding._MIN_FSDP_SIZE = 0
  # Batch 40 x 24 tokens: no parameter has a dimension of 40, 20, 10 or 5 rows, or 24 tokens.
  cfg = tiny_config(teacher, corpus, **{"parallel.fsdp": 4, "precision": "bfloat16", "batch_size": 40,
                                        "data.max_len": 24, "student.num_layers": 2})
  s = train.setup(cfg)
  batch = {k: jax.ShapeDtypeStruct((40, 24), jnp.int32, sharding=sharding.batch_sharding(s.mesh))
           for k in ("input_ids", "attention_mask")}
  text = s.step.lower(train.abstract_state(s), s.teacher_params, batch).compile().as_text()
  found = [{"kind": hlo.collective_kind(i.op), "arrays": i.arrays} for i in hlo.instructions(text)
           if hlo.collective_kind(i.op)]
  params = [list(x.shape) for x in jax.tree.leaves((train.abstract_state(s).params, s.teacher_params))]
  with open(out, "w") as f:
    json.dump({"collectives": found, "params": params, "devices": jax.device_count()}, f)


def spawn(teacher, corpus, runs, out, devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, __file__, teacher, corpus, json.dumps(runs), out],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return dict(np.load(out))


def test_eight_devices_match_one(tiny_teacher, tiny_corpus, tmp_path):
  one = {f"one device, dropout {d}": ("jit", 1, d) for d in (0.1, 0.0)}
  base = spawn(tiny_teacher, tiny_corpus, one, str(tmp_path / "one.npz"), 1)
  got = spawn(tiny_teacher, tiny_corpus, RUNS, str(tmp_path / "eight.npz"), 8)
  assert int(base["devices"]) == 1 and int(got["devices"]) == 8
  for name, (mode, fsdp, dropout) in RUNS.items():
    ref = f"one device, dropout {dropout}"
    keys = [k.split("|", 1)[1] for k in base if k.startswith(ref + "|") and "|spec|" not in k]
    assert "losses" in keys and len(keys) > 10
    for k in keys:
      np.testing.assert_allclose(got[f"{name}|{k}"], base[f"{ref}|{k}"], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name}: {k}")
    if fsdp > 1:  # the params really were sharded
      assert "fsdp" in str(got[f"{name}|spec|encoder/layer/0/intermediate/dense/kernel"])


def test_fsdp_rule():
  from jax.sharding import PartitionSpec as P
  from minilm_jax.sharding import fsdp_spec
  assert fsdp_spec((30522, 384), 8) == P(None, "fsdp")   # 30522 is not divisible by 8
  assert fsdp_spec((1536, 384), 2) == P("fsdp", None)
  assert fsdp_spec((384,), 8) == P()                      # small: replicated
  assert fsdp_spec((384, 384), 1) == P()


def test_fsdp_gathers_weights_never_the_batch(tiny_teacher, tiny_corpus, tmp_path):
  # FSDP shards the weights: the compiled step all-gathers parameters (where they are used) and
  # nothing with the batch in it, activations included; and reduces the gradients in fp32 under bf16.
  out = str(tmp_path / "hlo.json")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, __file__, "hlo", tiny_teacher, tiny_corpus, out],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.load(open(out))
  assert got["devices"] == 8
  param_shapes = {tuple(sorted(p)) for p in got["params"]}
  gathered = [tuple(dims) for c in got["collectives"] if c["kind"] == "all-gather"
              for _, dims in c["arrays"]]
  assert gathered, "fsdp=4 gathers its sharded weights"
  for dims in gathered:  # a weight (the result of the gather, or its shard): never a batch or seq axis
    assert not {40, 20, 10, 5, 24} & set(dims), dims
    assert any(len(dims) == len(p) for p in param_shapes), dims
  # ... and the gathered arrays are whole parameters (of the student or the teacher), or their shards.
  shards = {tuple(sorted(p[:i] + (p[i] // 4,) + p[i + 1:])) for p in param_shapes for i in range(len(p))}
  assert {tuple(sorted(d)) for d in gathered} <= param_shapes | shards
  reduced = [dt for c in got["collectives"] if c["kind"] in ("all-reduce", "reduce-scatter")
             for dt, _ in c["arrays"]]
  assert reduced and set(reduced) == {"f32"}


if __name__ == "__main__":
  if sys.argv[1] == "hlo":
    fsdp_collectives(*sys.argv[2:])
  else:
    teacher, corpus, runs, out = sys.argv[1:]
    run_steps(teacher, corpus, json.loads(runs), out)
