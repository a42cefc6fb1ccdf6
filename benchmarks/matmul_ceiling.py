"""The MFU ceiling of the distillation step's matmuls alone, under XLA:CPU and under PyTorch (MKL).

  python benchmarks/matmul_ceiling.py [--batch 32 --seq 128 --reps 5]

Every matmul the MiniLMv2 step performs at the target shape (all-MiniLM-L6-v2 teacher 6×384 up to its last
layer's Q/K/V; a 3×384 student forward and backward up to its last Q/K/V; the relation logits and their
backward, 12 relation heads), grouped by shape, each shape jitted and timed on its own, then summed with
its count. Nothing but matmuls: no softmax, GELU, dropout, LayerNorm or optimizer. The total time is a
lower bound for any step built from these kernels, so FLOPs ÷ that time ÷ the measured peak is the most
MFU the step could reach with every other op free. Prints a table and one JSON line.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

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


def time_jax(a, b, reps):
  x = jax.random.normal(jax.random.key(0), a, jnp.float32)
  y = jax.random.normal(jax.random.key(1), b, jnp.float32)
  f = jax.jit(jnp.matmul)
  f(x, y).block_until_ready()
  return best_seconds(lambda: f(x, y).block_until_ready(), reps)


def time_torch(a, b, reps):
  import torch
  x, y = torch.randn(*a), torch.randn(*b)
  torch.matmul(x, y)
  return best_seconds(lambda: torch.matmul(x, y), reps)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args()
  impls = {"jax": time_jax}
  if not args.no_torch:
    impls["torch"] = time_torch
  peak = measured_cpu_peak()
  total = {k: 0.0 for k in impls}
  step_flops = 0
  print(f"{'matmul':24} {'a':>16} {'b':>16} {'count':>5} " + " ".join(f"{k + ' GFLOP/s':>14}" for k in impls))
  for name, a, b, count in step_matmuls(args.batch, args.seq):
    f = flops(a, b)
    step_flops += f * count
    rates = {}
    for k, timer in impls.items():
      sec = timer(a, b, args.reps)
      total[k] += sec * count
      rates[k] = f / sec
    print(f"{name:24} {str(a):>16} {str(b):>16} {count:5d} "
          + " ".join(f"{rates[k] / 1e9:14.0f}" for k in impls))
  needed = minilm_flops_per_step(batch=args.batch, seq=args.seq, teacher_layers=6, teacher_hidden=384,
                                 teacher_intermediate=1536, student_layers=3, student_hidden=384,
                                 student_intermediate=1536)
  result = {"peak_flops_per_s": peak, "matmul_flops": step_flops, "model_flops_per_step": needed}
  for k, sec in total.items():
    result[f"{k}_matmul_ms"] = sec * 1e3
    result[f"{k}_mfu_ceiling"] = needed / sec / peak
  print(json.dumps(result))


if __name__ == "__main__":
  main()
