"""Run a benchmark once per XLA:CPU route, the routes alternating over rounds, and print one table.

  python benchmarks/routes.py [--routes all|NAME,NAME] [--rounds 3] [--metric tokens_per_s] \
      [--check loss] -- COMMAND ...

  e.g. python benchmarks/routes.py --rounds 3 -- python -m minilm_jax.bench --teacher DIR --steps 5

XLA reads XLA_FLAGS once, when JAX starts, so every run is a fresh process with XLA_FLAGS = the user's
XLA_FLAGS + the route's flags (minilm_jax.xla_flags.ROUTES). Round r runs the routes in order, then reversed, and so on, so
slow drift of the machine falls on every route alike. COMMAND prints a JSON object as its last line;
`--metric` is the number compared (min-median-max over rounds), `--check` a number that must equal the
default route's to `--rtol` (a route that is fast but wrong is reported as wrong). A run that exits
non-zero is reported with its exit status and last line of stderr. Prints the table, then one JSON line;
`--out` writes every run and that line, with the date, the commit and the command (docs/make_tables.py
makes performance.md's table of routes from it).
`benchmarks/step_profile.py --parts --routes` and `experiments/matmul_ceiling.py --routes` use the same
runner.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minilm_jax.xla_flags import ROUTES  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402  (beside this script)


def parse_routes(spec: str) -> list:
  names = list(ROUTES) if spec in ("", "all") else [s.strip() for s in spec.split(",") if s.strip()]
  unknown = [n for n in names if n not in ROUTES]
  if unknown:
    raise SystemExit(f"unknown route(s) {unknown}; known: {', '.join(ROUTES)}")
  if "default" in names:  # the reference runs first
    names.remove("default")
  return ["default", *names]


def route_env(route: str) -> dict:
  flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), ROUTES[route]) if f)
  return dict(os.environ, XLA_FLAGS=flags, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_one(cmd: list, route: str, timeout: float = 3600) -> dict:
  """The last JSON line COMMAND printed under `route`, or {"error": ...} when it failed."""
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, env=route_env(route), timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  if p.returncode != 0:
    sig = -p.returncode if p.returncode < 0 else p.returncode - 128 if p.returncode > 128 else 0
    name = f" ({signal.Signals(sig).name})" if sig in signal.valid_signals() and sig else ""
    tail = [l for l in (p.stderr or "").strip().splitlines() if l.strip()][-1:] or [""]
    return {"error": f"exit {p.returncode}{name}: {tail[0][:200]}"}
  lines = [l for l in p.stdout.strip().splitlines() if l.startswith("{")]
  return json.loads(lines[-1]) if lines else {"error": "no JSON line on stdout"}


def run_routes(cmd_for, routes: list, rounds: int, log=print) -> dict:
  """{route: [result per round]}; cmd_for(route, round) -> argv. Round 0 runs `routes` in order (the
  default first), each later round reverses the previous order."""
  results = {r: [] for r in routes}
  order = list(routes)
  for i in range(rounds):
    for route in order:
      res = run_one(cmd_for(route, i), route)
      res["route"], res["round"] = route, i
      results[route].append(res)
      log(json.dumps(res), file=sys.stderr, flush=True)
    order = order[::-1]
  return results


def spread(values: list) -> tuple:
  """(min, median, max), or None when there is nothing to summarise."""
  return (min(values), statistics.median(values), max(values)) if values else None


def fmt_spread(s, scale=1.0, digits=0) -> str:
  if s is None:
    return "-"
  return f"{s[1] * scale:,.{digits}f} ({s[0] * scale:,.{digits}f}-{s[2] * scale:,.{digits}f})"


def check_against_default(results: dict, key: str, rtol: float) -> dict:
  """{route: worst relative difference of `key` from the default route's value in the same round}."""
  out = {}
  for route, runs in results.items():
    worst = None
    for run, ref in zip(runs, results["default"]):
      if key in run and key in ref:
        d = abs(run[key] - ref[key]) / max(abs(ref[key]), 1e-30)
        worst = d if worst is None else max(worst, d)
    out[route] = worst
  return out


def summarise(results: dict, metric: str, check: str, rtol: float, higher_is_better: bool) -> dict:
  diffs = check_against_default(results, check, rtol) if check else {}
  rows = {}
  for route, runs in results.items():
    ok = [r for r in runs if "error" not in r and metric in r]
    errors = sorted({r["error"] for r in runs if "error" in r})
    row = {"runs": len(runs), "failed": len(runs) - len(ok), "spread": spread([r[metric] for r in ok])}
    if errors:
      row["error"] = errors[0]
    if check:
      d = diffs.get(route)
      row["check_rel_diff"] = d
      row["correct"] = None if d is None else d <= rtol
    rows[route] = row
  base = rows["default"]["spread"]
  for row in rows.values():
    if row["spread"] and base:
      ratio = row["spread"][1] / base[1]
      row["vs_default"] = ratio if higher_is_better else 1 / ratio
  return rows


def print_table(rows: dict, metric: str, check: str, digits: int = 0):
  head = f"{'route':24} {metric + ' median (min-max)':>34} {'vs default':>10}"
  head += f" {check + ' rel. diff':>16}" if check else ""
  print(head)
  for route, row in rows.items():
    line = f"{route:24} {fmt_spread(row['spread'], digits=digits):>34} "
    line += f"{row['vs_default']:10.3f}" if "vs_default" in row else f"{'':>10}"
    if check:
      d = row.get("check_rel_diff")
      verdict = "" if d is None else (" ok" if row["correct"] else " WRONG")
      line += f" {('-' if d is None else f'{d:.1e}') + verdict:>16}"
    if "error" in row:
      line += f"  FAILED {row['failed']}/{row['runs']}: {row['error']}"
    print(line)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--routes", default="all", help=f"all, or a comma list of: {', '.join(ROUTES)}")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--metric", default="tokens_per_s")
  p.add_argument("--lower-is-better", action="store_true", help="for a time metric")
  p.add_argument("--check", default="loss", help="a JSON key that must match the default route's")
  p.add_argument("--rtol", type=float, default=1e-5)
  p.add_argument("--out", help="write every run and the summary, with its provenance, here (JSON lines)")
  p.add_argument("cmd", nargs=argparse.REMAINDER)
  args = p.parse_args()
  prov = record.provenance("benchmarks/routes.py")
  cmd = [a for a in args.cmd if a != "--"] if args.cmd[:1] == ["--"] else args.cmd
  if cmd[:1] == ["python"]:
    cmd[0] = sys.executable
  if not cmd:
    p.error("give the benchmark command after --")
  routes = parse_routes(args.routes)
  with open("/proc/loadavg") as f:
    load_before = f.read().split()[:3]
  results = run_routes(lambda route, i: cmd, routes, args.rounds)
  with open("/proc/loadavg") as f:
    load_after = f.read().split()[:3]
  rows = summarise(results, args.metric, args.check, args.rtol, not args.lower_is_better)
  print(f"{len(routes)} routes x {args.rounds} rounds, alternating; load average before {load_before}, "
        f"after {load_after}")
  print_table(rows, args.metric, args.check)
  summary = {"metric": args.metric, "rounds": args.rounds, "check": args.check, "rtol": args.rtol,
             "load_before": load_before, "load_after": load_after, "routes": rows}
  print(json.dumps(summary))
  if args.out:
    record.write_jsonl(args.out, [r for runs in results.values() for r in runs] +
                       [{"route": "summary", **prov, **summary}])


if __name__ == "__main__":
  main()
