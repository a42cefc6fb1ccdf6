"""Where the trainer's whole step spends its time, by kind of work, from a profile of the compiled step.

  python benchmarks/step_profile.py [--steps 3] [--top 15]

The target shape (packaged 6×384 teacher → 3×384 student, batch 32 × 128, v2, 12 relation heads, a
quarter of the rows half padded), the trainer's own jitted step, traced with jax.profiler
(XLA_FLAGS gets --xla_cpu_enable_xprof_traceme=true, so XLA:CPU records each thunk). Each thunk's wall
time is summed over the traced steps, divided by their number, and attributed to a kind of work by the
compiled HLO's op names (the `op_name` of the thunk's instruction: its fusion root). "cpu/wall" is the
process's CPU time over wall time while tracing: 2.0 would be both cores busy the whole step.
Thunks can overlap (XLA:CPU runs independent thunks concurrently), so the kinds can add up to more than
the step. Prints one table and one JSON line.
"""

import argparse
import collections
import glob
import json
import os
import re
import resource
import tempfile
import time

if "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
from jax._src.lib import _profile_data  # noqa: E402

from minilm_jax import bench, config, hf, sharding, train  # noqa: E402

MATMULS = (("bntk,bnsk->bnts", "attention scores"), ("bnts,bnsk->bntk", "attention context"),
           ("bctd,bcsd->bcts", "relation logits"))


def kind_of(op_name: str, has_dot: bool) -> str:
  """A kind of work from an instruction's op_name (its JAX source path)."""
  bwd = "transpose(" in op_name
  side = " (backward)" if bwd else ""
  if has_dot:
    for spec, name in MATMULS:
      if spec in op_name:
        return f"matmul: {name}{side}"
    return f"matmul: projections and FFN{side}"
  if "Dropout" in op_name or "threefry" in op_name:
    return "dropout: random bits and mask"
  if "LayerNorm" in op_name:
    return f"LayerNorm{side}"
  if "intermediate" in op_name:
    return f"GELU{side}"
  if "/attention/" in op_name:
    return f"attention: mask, softmax, head transposes{side}"
  if "embeddings" in op_name:
    return f"embeddings{side}"
  if "BertEncoder" in op_name:
    return f"other encoder work{side}"
  return "loss, gradient norm, AdamW and the rest"


def instructions(hlo: str) -> dict:
  """{instruction name: (op_name, has_dot)}; a fusion has a dot when its computation has one."""
  comps, cur = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if m:
      cur = m.group(1)
      comps[cur] = []
    elif cur:
      comps[cur].append(line)
  out = {}
  for lines in comps.values():
    for line in lines:
      m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z\-]+)\(", line)
      if not m:
        continue
      name, opcode = m.groups()
      op = re.search(r'op_name="([^"]*)"', line)
      callee = re.search(r"calls=%([\w.\-]+)", line)
      has_dot = opcode == "dot" or bool(callee and any(" dot(" in l for l in comps.get(callee.group(1), [])))
      out[name] = (op.group(1) if op else "", has_dot)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=15, help="also list the most expensive instructions")
  args = p.parse_args()
  cfg = config.default_config()
  cfg.teacher = hf.packaged_teacher_path()
  s = train.setup(cfg)
  b = sharding.put_batch(s.mesh, bench.make_batch(32, 128, s.teacher_config.vocab_size, 0.25))
  state = s.init_state()
  compiled = s.step.lower(state, s.teacher_params, b).compile()
  instr = instructions(compiled.as_text())
  for _ in range(2):
    state, _ = compiled(state, s.teacher_params, b)
  jax.block_until_ready(state)
  trace_dir = tempfile.mkdtemp(prefix="step_profile_")
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    state, metrics = compiled(state, s.teacher_params, b)
  jax.block_until_ready((state, metrics))
  jax.profiler.stop_trace()
  wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  per_instr, unknown = collections.Counter(), collections.Counter()
  for plane in _profile_data.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in instr:
          per_instr[ev.name] += ev.duration_ns / 1e6 / args.steps
        else:
          unknown[ev.name] += ev.duration_ns / 1e6 / args.steps
  if os.environ.get("STEP_PROFILE_DEBUG"):
    print(unknown.most_common(20))
  kinds = collections.Counter()
  for name, ms in per_instr.items():
    kinds[kind_of(*instr[name])] += ms
  step_ms = 1e3 * wall / args.steps
  with open("/proc/loadavg") as f:
    load = f.read().split()[:3]
  print(f"step {step_ms:,.0f} ms (traced, {args.steps} steps), cpu/wall {cpu / wall:.2f}, load {load}")
  for kind, ms in kinds.most_common():
    print(f"  {kind:52} {ms:8,.0f} ms {100 * ms / step_ms:5.1f}%")
  print(f"  {'(sum of traced thunks)':52} {sum(kinds.values()):8,.0f} ms")
  print("  (XLA's own dot thunks, on the routes without YNN or oneDNN dots, are not traced)")
  print("most expensive instructions:")
  for name, ms in per_instr.most_common(args.top):
    print(f"  {name:36} {ms:7,.1f} ms  {kind_of(*instr[name]):44} {instr[name][0][-70:]}")
  print(json.dumps({"step_ms": step_ms, "cpu_per_wall": cpu / wall, "load": load,
                    "kinds_ms": dict(kinds.most_common()), "xla_flags": os.environ.get("XLA_FLAGS", "")}))


if __name__ == "__main__":
  main()
