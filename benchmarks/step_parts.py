"""Where the training step's time goes: each part jitted and timed on its own (fp32, this machine).

  python benchmarks/step_parts.py [--n 5]
  python benchmarks/step_parts.py --routes all [--rounds 3]   # every XLA:CPU route, alternating

Shapes: the packaged 6×384 teacher, the default 3×384 student, batch 32 × 128, MiniLMv2 with 12
relation heads, a quarter of the rows half padded (the benchmark's target shape). Parts overlap: the
"student forward + backward + loss" line includes the student forward and the loss; "the whole step" is
the trainer's own jitted step (AdamW included), state donated. "dropout's masks" draws the random bits of
every dropout the student applies in one step, and nothing else.

With `--routes`, each route of minilm_jax.xla_flags.ROUTES runs in its own process (XLA reads XLA_FLAGS
once), the routes alternating over rounds (benchmarks/routes.py); a route whose loss (with and without
dropout) or gradient norm differs from the default route's by more than 1e-5, relative, is WRONG.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

from minilm_jax import bench, config, hf, losses, objective, optimizer, sharding, train
from minilm_jax import model as model_lib
from minilm_jax.families import encoder_for

CHECKS = ("loss", "loss_dropout", "grad_norm")


def timeit(f, *args, n=5):
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
  cfg = config.default_config()
  cfg.teacher = hf.packaged_teacher_path()
  s = train.setup(cfg)
  b = sharding.put_batch(s.mesh, bench.make_batch(32, 128, s.teacher_config.vocab_size, 0.25))
  ids, mask = b["input_ids"], b["attention_mask"]
  state = s.init_state()
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


def run_routes(args):
  import routes as R
  names = R.parse_routes(args.routes)
  cmd = [sys.executable, os.path.abspath(__file__), "--n", str(args.n)]
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
  p.add_argument("--n", type=int, default=5, help="calls timed per part")
  p.add_argument("--routes", default="", help="all, or a comma list of minilm_jax.xla_flags.ROUTES")
  p.add_argument("--rounds", type=int, default=3, help="with --routes")
  args = p.parse_args()
  if args.routes:
    return run_routes(args)
  parts, checks = measure(args.n)
  for name, ms in parts.items():
    print(json.dumps({"part": name, "ms": round(ms, 1)}))
  print(json.dumps({"parts": parts, **checks}))


if __name__ == "__main__":
  main()
