"""The profile of the trainer's step: where its time goes, by kind of work from a trace of the compiled
step, or part by part, each part jitted and timed on its own.

  python benchmarks/step_profile.py [--steps 3] [--top 15]             # the compiled step, traced
  python benchmarks/step_profile.py --parts [--n 5]                    # each part alone
  python benchmarks/step_profile.py --parts --routes all [--rounds 3]  # the parts, every XLA:CPU route

Both at the target shape (the packaged 6×384 teacher → the default 3×384 student, batch 32 × 128,
MiniLMv2 with 12 relation heads, a quarter of the rows half padded), fp32, on this machine.

The trace (the default): the trainer's own jitted step, traced with jax.profiler (XLA_FLAGS gets
--xla_cpu_enable_xprof_traceme=true, so XLA:CPU records each thunk). Each thunk's wall time is summed
over the traced steps, divided by their number, and attributed to a kind of work by the compiled HLO's op
names (the `op_name` of the thunk's instruction: its fusion root). "cpu/wall" is the process's CPU time
over wall time while tracing: 2.0 would be both cores busy the whole step. Thunks can overlap (XLA:CPU
runs independent thunks concurrently), so the kinds can add up to more than the step. Prints one table
and one JSON line.

`--parts` (XLA_FLAGS as given: no tracing): the parts overlap: the "student forward + backward + loss"
line includes the student forward and the loss; "the whole step" is the trainer's own jitted step (AdamW
included), state donated. "dropout's masks" draws the random bits of every dropout the student applies in
one step, and nothing else. Prints one JSON line per part, then one with every part and the step's loss
(with and without dropout) and gradient norm. With `--routes`, each route of minilm_jax.xla_flags.ROUTES
runs the parts in its own process (XLA reads XLA_FLAGS once), the routes alternating over rounds
(benchmarks/routes.py); a route whose loss (with and without dropout) or gradient norm differs from the
default route's by more than 1e-5, relative, is WRONG.
"""

import argparse
import collections
import glob
import json
import os
import re
import resource
import sys
import tempfile
import time

TRACEME = "--xla_cpu_enable_xprof_traceme"
MATMULS = (("bntk,bnsk->bnts", "attention scores"), ("bnts,bnsk->bntk", "attention context"),
           ("bctd,bcsd->bcts", "relation logits"))
CHECKS = ("loss", "loss_dropout", "grad_norm")


def target_step():
  """The trainer's setup at the target shape, its batch and a fresh state."""
  from minilm_jax import bench, config, hf, sharding, train
  cfg = config.default_config()
  cfg.teacher = hf.packaged_teacher_path()
  s = train.setup(cfg)
  b = sharding.put_batch(s.mesh, bench.make_batch(32, 128, s.teacher_config.vocab_size, 0.25))
  return cfg, s, b, s.init_state()


# ---- the trace ------------------------------------------------------------------------------------------

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


def trace(args):
  # XLA reads XLA_FLAGS once, when the first backend starts: set before anything imports JAX.
  if TRACEME not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {TRACEME}=true").strip()
  import jax
  from jax._src.lib import _profile_data
  _, s, b, state = target_step()
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


# ---- the parts ------------------------------------------------------------------------------------------

def timeit(f, *args, n=5):
  import jax
  jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(n):
    out = f(*args)
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - t) / n


def dropout_shapes(scfg, batch, seq):
  """The shapes the student's dropout masks one step: embeddings, and per full layer the attention
  probabilities and the two AddNorm outputs (its last layer stops at Q/K/V)."""
  h, heads, full = scfg.hidden_size, scfg.num_attention_heads, scfg.num_hidden_layers - 1
  return [(batch, seq, h)] + full * [(batch, heads, seq, seq), (batch, seq, h), (batch, seq, h)]


def measure(n):
  import jax
  import jax.numpy as jnp
  import optax
  from minilm_jax import losses, objective, optimizer
  from minilm_jax import model as model_lib
  from minilm_jax.families import encoder_for
  cfg, s, b, state = target_step()
  ids, mask = b["input_ids"], b["attention_mask"]
  teacher, student = encoder_for(s.teacher_config), encoder_for(s.student_config)
  loss = lambda t, x: losses.minilm_v2_loss(t, x, mask, cfg.loss.relation_heads)
  t_fwd = jax.jit(lambda p: teacher.apply({"params": p}, ids, mask, stop_at_capture=True).qkv)
  s_fwd = jax.jit(lambda p: student.apply({"params": p}, ids, mask, stop_at_capture=True).qkv)
  tq, sq = t_fwd(s.teacher_params), s_fwd(state.params)
  distill = objective.distill_loss_fn(cfg, teacher, student, s.teacher_layer)
  s_grad = jax.jit(jax.grad(lambda p, k: distill(p, s.teacher_params, b, k)))
  s_grad_nodrop = jax.jit(jax.grad(lambda p: distill(p, s.teacher_params, b)))
  grads = s_grad(state.params, jax.random.key(0))
  tx = optimizer.make_optimizer(cfg, state.params, s.student_config)
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
  shapes = dropout_shapes(s.student_config, 32, 128)
  rate = s.student_config.hidden_dropout_prob
  masks = jax.jit(lambda k: [model_lib.dropout(jnp.ones(sh), rate, jax.random.fold_in(k, i))
                             for i, sh in enumerate(shapes)])
  checks = {"loss": float(jax.jit(lambda p: distill(p, s.teacher_params, b))(state.params)),
            "loss_dropout": float(jax.jit(lambda p: distill(p, s.teacher_params, b, jax.random.key(0)))(
                state.params)),
            "grad_norm": float(optax.global_norm(grads))}
  parts = {
      "teacher forward (to its last Q/K/V)": timeit(t_fwd, s.teacher_params, n=n),
      "student forward (to its last Q/K/V)": timeit(s_fwd, state.params, n=n),
      "loss forward": timeit(jax.jit(loss), tq, sq, n=n),
      "loss forward + backward": timeit(jax.jit(jax.grad(loss, argnums=1)), tq, sq, n=n),
      "teacher + student forward + backward + loss, dropout": timeit(s_grad, state.params,
                                                                     jax.random.key(0), n=n),
      "same without dropout": timeit(s_grad_nodrop, state.params, n=n),
      "dropout's masks alone": timeit(masks, jax.random.key(0), n=n),
      "AdamW update": timeit(update, grads, state.opt_state, state.params, n=n),
  }
  step = s.step.lower(state, s.teacher_params, b).compile()
  state, _ = step(state, s.teacher_params, b)  # warm-up; the state is donated, so carry it along
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(n):
    state, metrics = step(state, s.teacher_params, b)
  jax.block_until_ready((state, metrics))
  parts["the whole step (the trainer's, AdamW included)"] = 1e3 * (time.perf_counter() - t) / n
  return parts, checks


def parts_by_route(args):
  import routes as R
  names = R.parse_routes(args.routes)
  cmd = [sys.executable, os.path.abspath(__file__), "--parts", "--n", str(args.n)]
  load_before = open("/proc/loadavg").read().split()[:3]
  results = R.run_routes(lambda route, i: cmd, names, args.rounds)
  load_after = open("/proc/loadavg").read().split()[:3]
  ok = lambda runs: [r for r in runs if "error" not in r]
  print(f"{len(names)} routes x {args.rounds} rounds, alternating; load average before {load_before}, "
        f"after {load_after}. ms: median (min-max) over rounds of each run's mean of {args.n} calls.")
  parts = next((list(r["parts"]) for n in names for r in ok(results[n])), [])
  diffs = {k: R.check_against_default(results, k, 1e-5) for k in CHECKS}
  rows = {}
  for n in names:
    runs = ok(results[n])
    worst = [d[n] for d in diffs.values() if d.get(n) is not None]
    rows[n] = {"parts_ms": {p: R.spread([r["parts"][p] for r in runs]) for p in parts},
               "check_rel_diff": max(worst) if worst else None, "failed": len(results[n]) - len(runs)}
    errors = sorted({r["error"] for r in results[n] if "error" in r})
    if errors:
      rows[n]["error"] = errors[0]
  for n, row in rows.items():
    d = row["check_rel_diff"]
    verdict = "-" if d is None else f"{d:.1e} " + ("ok" if d <= 1e-5 else "WRONG")
    print(f"\n{n}: loss and gradient vs default {verdict}"
          + (f"; FAILED {row['failed']}/{args.rounds}: {row['error']}" if "error" in row else ""))
    for p in parts:
      print(f"  {p:55} {R.fmt_spread(row['parts_ms'][p]):>26}")
  print(json.dumps({"rounds": args.rounds, "load_before": load_before, "load_after": load_after,
                    "routes": rows}))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=3, help="steps traced")
  p.add_argument("--top", type=int, default=15, help="also list the most expensive instructions")
  p.add_argument("--parts", action="store_true", help="time each part of the step alone instead")
  p.add_argument("--n", type=int, default=5, help="with --parts: calls timed per part")
  p.add_argument("--routes", default="", help="with --parts: all, or a comma list of "
                 "minilm_jax.xla_flags.ROUTES")
  p.add_argument("--rounds", type=int, default=3, help="with --routes")
  args = p.parse_args()
  if args.routes and not args.parts:
    p.error("--routes times the parts under each route: give --parts too")
  if not args.parts:
    return trace(args)
  if args.routes:
    return parts_by_route(args)
  parts, checks = measure(args.n)
  for name, ms in parts.items():
    print(json.dumps({"part": name, "ms": round(ms, 1)}))
  print(json.dumps({"parts": parts, **checks}))


if __name__ == "__main__":
  main()
