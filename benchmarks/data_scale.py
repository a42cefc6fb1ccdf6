"""The data path at scale: tokenisation throughput against processes, and a run's memory against corpus size.

  python benchmarks/data_scale.py corpus --out /tmp/big.txt --mb 1024
  python benchmarks/data_scale.py throughput --source /tmp/big.txt --procs 1 2 --rounds 1 [--out FILE]
  python benchmarks/data_scale.py memory --source /tmp/big.txt --steps 20 [--out FILE]

`corpus` writes a .txt corpus of about --mb megabytes: the pydocs corpus (stdlib and installed packages'
docstrings, ~43 MB) over and over, each pass shuffled differently, blank lines between documents.
`throughput` tokenises --source into fresh shard folders with each process count in turn (in a new
process each time, as minilm-prepare would; --rounds times, alternating) and prints tokens/s, per process,
and the speed-up over the first count. `memory` runs the demo config for --steps steps from a fresh
workdir over the demo corpus and over --source (tokenisation included) and prints each run's peak
resident memory: the largest of minilm-distill and its tokenising processes (getrusage of the children).
`--out` writes the runs' JSON lines and a last one with the date, the commit and the command, from which
docs/make_tables.py makes data.md's tables.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import record  # noqa: E402  (beside this script)
SCRIPT = "benchmarks/data_scale.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def make_corpus(out: str, mb: int, seed: int = 0) -> None:
  from minilm_jax import corpus
  docs = list(corpus.pydocs_corpus("train"))
  rng, size = random.Random(seed), 0
  with open(out, "w", encoding="utf-8") as f:
    while size < mb << 20:
      rng.shuffle(docs)
      for d in docs:
        f.write(d + "\n\n")
        size += len(d.encode()) + 2
        if size >= mb << 20:
          break
  print(json.dumps({"corpus": out, "bytes": os.path.getsize(out)}))


PREPARE = """
import json, sys, time
from minilm_jax import hf, shards
t0 = time.time()
folder = shards.prepare(sys.argv[1], hf.packaged_teacher_path(), 128, sys.argv[2], num_proc=int(sys.argv[3]),
                        log=lambda m: None)
secs = time.time() - t0
m = json.load(open(folder + "/manifest.json"))
print(json.dumps({"tokens": m["tokens"], "docs": m["docs"], "shards": len(m["shards"]), "secs": secs}))
"""


def throughput(source: str, procs, rounds: int, out_path=None) -> None:
  prov = record.provenance(SCRIPT)
  runs = {p: [] for p in procs}
  for r in range(rounds):
    for p in procs:
      with tempfile.TemporaryDirectory() as cache:
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, "-c", PREPARE, source, cache, str(p)], env=ENV, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
      rec = {**json.loads(out), "procs": p, "round": r, "load_before": round(load, 2)}
      rec["tokens_per_s"] = rec["tokens"] / rec["secs"]
      rec["tokens_per_s_per_proc"] = rec["tokens_per_s"] / p
      runs[p].append(rec)
      print(json.dumps(rec), flush=True)
  base = sorted(r["tokens_per_s"] for r in runs[procs[0]])
  for p in procs:
    tps = sorted(r["tokens_per_s"] for r in runs[p])
    print(json.dumps({"procs": p, "tokens_per_s_min_median_max": [tps[0], tps[len(tps) // 2], tps[-1]],
                      "speedup_median": tps[len(tps) // 2] / base[len(base) // 2]}))
  if out_path:
    record.write_jsonl(out_path, [r for p in procs for r in runs[p]] + [
        {"summary": True, "source_bytes": os.path.getsize(source), **prov}])


MEASURED = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(r.returncode)
"""


def memory(source: str, steps: int, out_path=None) -> None:
  prov = record.provenance(SCRIPT)
  out = {}
  for name, src in (("demo corpus", "stdlib"), (os.path.basename(source), source)):
    with tempfile.TemporaryDirectory() as work:
      cmd = [os.path.join(os.path.dirname(sys.executable), "minilm-distill"), "--config",
             os.path.join(ROOT, "configs", "demo.py"), "--workdir", work, f"--config.steps={steps}",
             f"--config.data.source={src}", f"--config.checkpoint_every={steps}"]
      t0 = time.time()
      r = subprocess.run([sys.executable, "-c", MEASURED, *cmd], env=ENV, capture_output=True, text=True)
      if r.returncode:
        sys.exit(r.stderr[-2000:])
      out[name] = {"peak_rss_mb": int(r.stdout.strip().splitlines()[-1]) / 1024, "secs": time.time() - t0,
                   "source_bytes": os.path.getsize(src) if os.path.isfile(src) else None}
      print(json.dumps({name: out[name]}), flush=True)
  a, b = out.values()
  print(json.dumps({"peak_rss_difference_mb": b["peak_rss_mb"] - a["peak_rss_mb"]}))
  if out_path:
    record.write_jsonl(out_path, [{"run": name, "steps": steps, **r} for name, r in out.items()] + [
        {"summary": True, **prov}])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("corpus")
  c.add_argument("--out", required=True)
  c.add_argument("--mb", type=int, default=1024)
  t = sub.add_parser("throughput")
  t.add_argument("--source", required=True)
  t.add_argument("--procs", type=int, nargs="+", default=[1, 2])
  t.add_argument("--rounds", type=int, default=1)
  t.add_argument("--out", help="write the runs and their provenance here (JSON lines)")
  m = sub.add_parser("memory")
  m.add_argument("--source", required=True)
  m.add_argument("--steps", type=int, default=20)
  m.add_argument("--out", help="write the runs and their provenance here (JSON lines)")
  a = p.parse_args()
  if a.cmd == "corpus":
    make_corpus(a.out, a.mb)
  elif a.cmd == "throughput":
    throughput(a.source, a.procs, a.rounds, a.out)
  else:
    memory(a.source, a.steps, a.out)


if __name__ == "__main__":
  main()
