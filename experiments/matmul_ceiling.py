"""The MFU ceiling of the distillation step's matmuls alone, under XLA:CPU and under PyTorch (MKL).

  python experiments/matmul_ceiling.py [--batch 32 --seq 128 --reps 5]

Every matmul the MiniLMv2 step performs at the target shape (all-MiniLM-L6-v2 teacher 6×384 up to its last
layer's Q/K/V; a 3×384 student forward and backward up to its last Q/K/V; the relation logits and their
backward, 12 relation heads), grouped by shape, each shape jitted and timed on its own, then summed with
its count. Nothing but matmuls: no softmax, GELU, dropout, LayerNorm or optimizer. The total time is a
lower bound for any step built from these kernels, so FLOPs ÷ that time ÷ the measured peak is the most
MFU the step could reach with every other op free. Prints a table and one JSON line.

  python experiments/matmul_ceiling.py --routes all [--rounds 3]

times the same matmuls under each XLA:CPU route (minilm_jax.xla_flags.ROUTES: YNNPACK fusions as XLA
makes them, each YNN fusion type taken out, XLA's own dots, oneDNN), each route in its own process
(XLA reads XLA_FLAGS once), the routes alternating over rounds (benchmarks/routes.py). Every route's
outputs are compared with the default route's (same inputs): worse than 1e-5 of the largest output,
relative, is reported as WRONG. The peak is measured in each process, under its route.

  python experiments/matmul_ceiling.py --out docs/results/matmul_ceiling.jsonl

also times XLA:CPU's matmuls once more in a process pinned to one core (`--one-core`), and writes both
runs' JSON lines and the provenance to FILE (docs/make_tables.py's `matmul_ceiling` table): a matmul
that runs as fast on one core as on all of them runs on one. About 2 minutes on 2 cores.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import record  # noqa: E402  (benchmarks/record.py: provenance and JSON lines)

from minilm_jax.bench import measured_cpu_peak, minilm_flops_per_step


def step_matmuls(batch, seq, hidden=384, inter=1536, heads=12, rel_heads=12, t_layers=6, s_layers=3):
  """[(name, a_shape, b_shape, count)]: a @ b with a [..., m, k], b [..., k, n]."""
  n, d, dr, bh, br = batch * seq, hidden // heads, hidden // rel_heads, batch * heads, batch * rel_heads
  fwd = lambda layers: {  # per model: full layers below the distilled one, then only its Q/K/V
      "qkv/out proj": 3 * layers + (layers - 1), "ffn up": layers - 1, "ffn down": layers - 1,
      "scores": layers - 1, "context": layers - 1}
  t, s = fwd(t_layers), fwd(s_layers)
  shapes = {  # forward shape; each student matmul has two backward matmuls of the same FLOPs
      "qkv/out proj": ((n, hidden), (hidden, hidden)), "ffn up": ((n, hidden), (hidden, inter)),
      "ffn down": ((n, inter), (inter, hidden)), "scores": ((bh, seq, d), (bh, d, seq)),
      "context": ((bh, seq, seq), (bh, seq, d))}
  out = []
  for k, (a, b) in shapes.items():
    out.append((f"{k} fwd", a, b, t[k] + s[k]))
    m, kk, nn = a[-2], a[-1], b[-1]
    lead = a[:-2]
    out.append((f"{k} bwd da", (*lead, m, nn), (*lead, nn, kk), s[k]))     # g @ Wᵀ
    out.append((f"{k} bwd db", (*lead, kk, m), (*lead, m, nn), s[k]))      # xᵀ @ g
  rel = ((br, seq, dr), (br, dr, seq))
  out += [("relation logits fwd", *rel, 3 + 3), ("relation logits bwd", (br, seq, seq), (br, seq, dr), 2 * 3)]
  return [(name, a, b, c) for name, a, b, c in out if c]


def flops(a, b):
  return 2 * int(np.prod(a[:-1])) * a[-1] * b[-1]


def best_seconds(fn, reps):
  """Fastest of `reps` timed calls of `fn` (already warmed up)."""
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def inputs(a, b, seed):
  """The same operands under every route (numpy's generator, not XLA's)."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal(a, np.float32), rng.standard_normal(b, np.float32)


def time_jax(a, b, reps, seed=0, outputs=None, name=None):
  x, y = map(jnp.asarray, inputs(a, b, seed))
  f = jax.jit(jnp.matmul)
  out = f(x, y).block_until_ready()
  if outputs is not None:
    outputs[name] = np.asarray(out)
  return best_seconds(lambda: f(x, y).block_until_ready(), reps)


def time_torch(a, b, reps, seed=0, outputs=None, name=None):
  import torch
  x, y = map(torch.from_numpy, inputs(a, b, seed))
  torch.matmul(x, y)
  return best_seconds(lambda: torch.matmul(x, y), reps)


def library_fusions():
  """How the route compiled a batched and a plain matmul: {kind: count} of its library fusions."""
  out = {}
  for a, b in (((384, 128, 32), (384, 32, 128)), ((4096, 384), (384, 384))):
    text = jax.jit(jnp.matmul).lower(jnp.zeros(a), jnp.zeros(b)).compile().as_text()
    for kind in ("__ynn_fusion", "__onednn_fusion"):
      out[kind.strip("_")] = out.get(kind.strip("_"), 0) + text.count(f'"kind":"{kind}"')
  return out


def rel_error(outputs, reference_path):
  """Worst over the matmuls of max|out - ref| / max|ref|."""
  ref = np.load(reference_path)
  return max(float(np.max(np.abs(outputs[k] - ref[k])) / np.max(np.abs(ref[k]))) for k in ref.files)


def run_routes(args):
  """Each route in its own process, alternating; one table of GFLOP/s by matmul and route."""
  import routes as R  # benchmarks/routes.py: the runner the benchmarks use
  names = R.parse_routes(args.routes)
  tmp = tempfile.mkdtemp(prefix="matmul_routes_")
  ref = os.path.join(tmp, "default.npz")
  base = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch), "--seq", str(args.seq),
          "--reps", str(args.reps), "--no-torch"]

  def cmd(route, i):  # round 0 saves the default's outputs, then checks every other route's
    if i > 0:
      return base
    return base + (["--save", ref] if route == "default" else ["--reference", ref])

  load_before = open("/proc/loadavg").read().split()[:3]
  try:
    results = R.run_routes(cmd, names, args.rounds)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  load_after = open("/proc/loadavg").read().split()[:3]
  ok = lambda runs: [r for r in runs if "error" not in r]
  print(f"{len(names)} routes x {args.rounds} rounds, alternating; load average before {load_before}, "
        f"after {load_after}. GFLOP/s: median over rounds of each run's best of {args.reps}.")
  print(f"{'matmul':24} {'count':>5} " + " ".join(f"{n[:13]:>13}" for n in names))
  shapes = [name for name, *_ in step_matmuls(args.batch, args.seq)]
  counts = {name: c for name, _, _, c in step_matmuls(args.batch, args.seq)}
  for shape in shapes:
    cells = []
    for n in names:
      v = [r["gflops"][shape] for r in ok(results[n])]
      cells.append(f"{statistics.median(v):13.0f}" if v else f"{'-':>13}")
    print(f"{shape:24} {counts[shape]:5d} " + " ".join(cells))
  rows = {}
  for n in names:
    runs = ok(results[n])
    rows[n] = {"matmul_ms": R.spread([r["jax_matmul_ms"] for r in runs]),
               "mfu_ceiling": R.spread([r["jax_mfu_ceiling"] for r in runs]),
               "peak_gflops": R.spread([r["peak_flops_per_s"] / 1e9 for r in runs]),
               "rel_error": next((r["rel_error"] for r in runs if "rel_error" in r), None),
               "fusions": runs[0]["fusions"] if runs else None,
               "failed": len(results[n]) - len(runs)}
    errors = sorted({r["error"] for r in results[n] if "error" in r})
    if errors:
      rows[n]["error"] = errors[0]
  print(f"\n{'route':24} {'all matmuls, ms':>28} {'peak GFLOP/s':>22} {'MFU ceiling':>20} {'rel. error':>16}")
  for n, row in rows.items():
    err = row["rel_error"]
    verdict = "-" if err is None else f"{err:.1e} " + ("ok" if err <= 1e-5 else "WRONG")
    print(f"{n:24} {R.fmt_spread(row['matmul_ms']):>28} {R.fmt_spread(row['peak_gflops']):>22} "
          f"{R.fmt_spread(row['mfu_ceiling'], digits=3):>20} {verdict:>16}"
          + (f"  FAILED {row['failed']}/{args.rounds}: {row['error']}" if "error" in row else ""))
  print(json.dumps({"rounds": args.rounds, "load_before": load_before, "load_after": load_after,
                    "routes": rows}))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--routes", default="", help="all, or a comma list of minilm_jax.xla_flags.ROUTES: "
                 "time each route in its own process (no torch column)")
  p.add_argument("--rounds", type=int, default=3, help="with --routes")
  p.add_argument("--save", default="", help=argparse.SUPPRESS)       # the route runner's
  p.add_argument("--reference", default="", help=argparse.SUPPRESS)  # correctness check
  p.add_argument("--one-core", action="store_true", help="run on one core only (set before JAX starts)")
  p.add_argument("--out", default="", help="also time XLA on one core, in its own process; write both "
                 "runs and the provenance to this file (JSON lines)")
  args = p.parse_args()
  if args.routes:
    return run_routes(args)
  if args.one_core:  # before XLA:CPU starts its threads: every one of them is then confined to this core
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  prov = record.provenance("experiments/matmul_ceiling.py") if args.out else None
  impls = {"jax": time_jax}
  if not args.no_torch:
    impls["torch"] = time_torch
  peak = measured_cpu_peak()
  total = {k: 0.0 for k in impls}
  outputs = {} if (args.save or args.reference) else None
  gflops, torch_gflops, shapes = {}, {}, {}
  step_flops = 0
  print(f"{'matmul':24} {'a':>16} {'b':>16} {'count':>5} " + " ".join(f"{k + ' GFLOP/s':>14}" for k in impls))
  for name, a, b, count in step_matmuls(args.batch, args.seq):
    f = flops(a, b)
    step_flops += f * count
    rates = {}
    for k, timer in impls.items():
      sec = timer(a, b, args.reps, outputs=outputs if k == "jax" else None, name=name)
      total[k] += sec * count
      rates[k] = f / sec
    gflops[name], shapes[name] = rates["jax"] / 1e9, [a, b, count]
    if "torch" in rates:
      torch_gflops[name] = rates["torch"] / 1e9
    print(f"{name:24} {str(a):>16} {str(b):>16} {count:5d} "
          + " ".join(f"{rates[k] / 1e9:14.0f}" for k in impls))
  needed = minilm_flops_per_step(batch=args.batch, seq=args.seq, teacher_layers=6, teacher_hidden=384,
                                 teacher_intermediate=1536, student_layers=3, student_hidden=384,
                                 student_intermediate=1536)
  result = {"cores": len(os.sched_getaffinity(0)), "peak_flops_per_s": peak, "matmul_flops": step_flops,
            "model_flops_per_step": needed, "gflops": gflops, "fusions": library_fusions(),
            "shapes": shapes}
  if torch_gflops:
    result["torch_gflops"] = torch_gflops
  if args.save:
    np.savez(args.save, **outputs)
  if args.reference:
    result["rel_error"] = rel_error(outputs, args.reference)
  for k, sec in total.items():
    result[f"{k}_matmul_ms"] = sec * 1e3
    result[f"{k}_mfu_ceiling"] = needed / sec / peak
  print(json.dumps(result))
  if args.out:
    one = record.run_json([sys.executable, os.path.abspath(__file__), "--batch", str(args.batch),
                           "--seq", str(args.seq), "--reps", str(args.reps), "--no-torch", "--one-core"])
    print(json.dumps(one))
    record.write_jsonl(args.out, [{"run": "all cores", **result}, {"run": "one core", **one},
                                  {"run": "summary", **prov}])


if __name__ == "__main__":
  main()
