"""A finished run's student averaged in weight space with the layers it started from (α·student + (1−α)·
start, as WiSE-FT does with a fine-tuned model and its pre-trained one), on every probe of `minilm-eval`,
with its differences, paired over the same items, from every row of that run's table: the check in docs/experiments.md
whether such a merge gives back the start's sentence-pair skill while keeping the distilled probes.

  minilm-eval --workdir workdirs/quality_l3 --out workdirs/l3_paired                  # the table first
  python experiments/merge_start.py --workdir workdirs/quality_l3 --table workdirs/l3_paired --alpha 0.5

Give `--text` exactly as the table was made (the table's settings are checked). About 6 minutes per α
for a 3×384 student on this project's 2 cores with fine-tuning. Prints one JSON line per α: the merged
model's values, and each difference "merged − row" as value ± SE (z).
"""

import argparse
import json
import os

import jax
import numpy as np
from transformers import AutoTokenizer

from minilm_jax.evaluation import protocol, runs, stats, suite
from minilm_jax import workdir as wd

def merge(student, start, alpha: float):
  """α·student + (1−α)·start, leaf by leaf (same trees), computed in float64, kept in each leaf's dtype."""
  return jax.tree.map(lambda s, b: (alpha * np.asarray(s, np.float64) + (1 - alpha) * np.asarray(b, np.float64)
                                    ).astype(np.asarray(s).dtype), student, start)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a finished run (its student is exported)")
  p.add_argument("--table", required=True, help="minilm-eval's --out of that run (its results.json)")
  p.add_argument("--text", help="held-out text, as the table was made with (default: the stdlib's held-out split)")
  p.add_argument("--alpha", type=float, action="append", help="the student's weight, repeat (default 0.5)")
  a = p.parse_args()
  alphas = a.alpha or [0.5]
  if any(not 0 <= x <= 1 for x in alphas):
    p.error(f"--alpha must be in [0, 1], not {alphas}")
  path = os.path.join(a.table, "results.json")
  if not os.path.isfile(path):
    p.error(f"{path}: no table; run minilm-eval --workdir {a.workdir} --out {a.table} first")
  with open(path) as f:
    table = json.load(f)
  d = protocol.DEFAULT_PROTOCOL
  tasks = table["settings"]["tasks"]
  if not protocol.made_with(table["settings"], protocol.settings_of(d, a.text, tasks, ())):
    p.error(f"{path} was made with other settings ({table['settings']}); give --text as it was, or "
            "evaluate the run again")
  cfg, models, teacher_dir = runs.models_of_runs([a.workdir])
  starts = ("teacher_first", "teacher")
  if cfg.student.init not in starts:
    p.error(f"{a.workdir} started from {cfg.student.init!r}: only a start from the teacher's layers "
            f"({', '.join(starts)}) is a baseline of the table to merge with")
  config, student = models[runs.student_name(a.workdir)]
  # Where every k-th layer is the first n (k = 1), the table has that start as the first layers' row.
  first = models[runs.BASELINE_NAMES["teacher_first"]]
  start = models.get(runs.BASELINE_NAMES[cfg.student.init], first)[1]
  tok = AutoTokenizer.from_pretrained(wd.local_student(a.workdir))
  s = suite.make_suite(cfg, tok, models["teacher"], teacher_dir, d, a.text, tasks)
  rows = table["results"]
  for alpha in alphas:
    row = suite.quality(s, (config, merge(student, start, alpha)), False, bool(tasks))
    out = {"alpha": alpha, "values": {m: v["value"] for m, v in row.items()}}
    for name, other in rows.items():
      for m, v in row.items():
        diff = stats.paired_difference(m, v, other.get(m, {}), rows["teacher"].get(m), d.bootstrap, d.seed)
        if diff is not None:
          out.setdefault(f"merged − {name}", {})[m] = f"{diff['value']:+.3f} ± {diff['se']:.3f} ({diff['z']:+.1f})"
    print(json.dumps(out, ensure_ascii=False), flush=True)


if __name__ == "__main__":
  main()
