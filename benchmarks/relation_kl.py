"""The relation loss's three paths, timed and sized: direct, head-chunked, and blockwise over keys.

  python benchmarks/relation_kl.py [--seqs 128 512 2048] [--batch-tokens 16384] [--blocks 64 128] \
      [--reps 5] [--out docs/results/relation_kl.jsonl]

For each sequence length T (batch = batch-tokens / T, 12 relation heads, teacher and student widths 384,
MiniLMv2: Q-Q, K-K, V-V, a quarter of the rows half padded) it jits value-and-gradient of the loss with
respect to the student's Q/K/V, and prints one JSON line per path: the median of `--reps` timed runs
(alternating paths, so drift on a shared machine hits all of them alike), min and max, and XLA's
memory analysis of the compiled function (arguments + outputs + temporaries). A path whose compiled
memory exceeds `--max-gb` is reported but not run. `--out` also writes those lines and a last one with
the date, the commit and the command (docs/make_tables.py makes performance.md's table from it).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402  (beside this script)


def paths(heads, blocks):
  yield "direct", dict(chunk_heads=heads)
  yield "chunked (1 head at a time)", dict(chunk_heads=1)
  for k in blocks:
    yield f"blockwise ({k} keys)", dict(block_keys=k)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048])
  p.add_argument("--batch-tokens", type=int, default=16384)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--width", type=int, default=384)
  p.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--max-gb", type=float, default=12.0)
  p.add_argument("--out", help="write the lines and their provenance here (JSON lines)")
  a = p.parse_args(argv)
  prov = record.provenance("benchmarks/relation_kl.py", argv)
  lines = []
  for t in a.seqs:
    b = max(1, a.batch_tokens // t)
    rng = np.random.default_rng(0)
    x = lambda: jnp.asarray(rng.standard_normal((b, t, a.width)), jnp.float32)
    tqkv, sqkv = (x(), x(), x()), (x(), x(), x())
    mask = np.ones((b, t), np.int32)
    mask[: b // 4, t // 2:] = 0
    mask = jnp.asarray(mask)
    runs = {}
    for name, kw in paths(a.heads, a.blocks):
      # The teacher's Q/K/V and the mask are arguments, not constants XLA could fold ahead of time.
      f = jax.jit(jax.value_and_grad(
          lambda s, t, m, kw=kw: losses.minilm_v2_loss(t, s, m, a.heads, **kw)))
      compiled = f.lower(sqkv, tqkv, mask).compile()
      m = compiled.memory_analysis()
      mem = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
      runs[name] = {"compiled": compiled, "memory_bytes": mem, "ms": []}
      if mem <= a.max_gb * 2**30:
        jax.block_until_ready(compiled(sqkv, tqkv, mask))  # warm up
    for _ in range(a.reps):
      for name, r in runs.items():
        if r["memory_bytes"] > a.max_gb * 2**30:
          continue
        t0 = time.perf_counter()
        jax.block_until_ready(r["compiled"](sqkv, tqkv, mask))
        r["ms"].append(1e3 * (time.perf_counter() - t0))
    for name, r in runs.items():
      ms = sorted(r["ms"])
      lines.append({"seq": t, "batch": b, "path": name, "memory_gb": round(r["memory_bytes"] / 2**30, 3),
                    "ms_median": round(ms[len(ms) // 2], 1) if ms else None,
                    "ms_min": round(ms[0], 1) if ms else None, "ms_max": round(ms[-1], 1) if ms else None,
                    "reps": len(ms)})
      print(json.dumps(lines[-1]), flush=True)
  if a.out:
    shape = {"heads": a.heads, "width": a.width, "batch_tokens": a.batch_tokens}
    record.write_jsonl(a.out, lines + [{"path": "summary", **shape, **prov}])


if __name__ == "__main__":
  main()
