"""The whole step at long sequences on this CPU (512 and 2048 tokens): the relation loss's paths inside
a training step, timed and sized.

  python benchmarks/long_steps.py [--rounds 2] [--out docs/results/long_steps.jsonl]

Rows (`python -m minilm_jax.bench`, the packaged all-MiniLM-L6-v2 teacher → 3×384, v2, a quarter of the
rows half padded, fp32), each run in a fresh process, the rows alternating over `--rounds` so that the
machine's drift falls on all of them alike:
- batch 8 × 512, 48 relation heads: the default relation loss (blockwise over 128 keys), and one head at
  a time (`--chunk-heads 1`);
- batch 8 × 2048 with a random 6-layer teacher of the same widths and 2048 positions, 12 relation heads:
  the default, one head at a time, and the direct loss (`--chunk-heads 12`) compiled only, for its
  memory (it does not fit this machine's 24 GiB);
- batch 1 × 8192 with a random ModernBERT-base-shaped teacher (22×768, the packaged config of the
  ModernBERT recipe's teacher) → 6×384 (6 heads, GeGLU FFN 576), 12 relation heads: the default.
Prints each run's JSON line; `--out` writes them and a last line with the date, the commit and the
command (docs/make_tables.py makes performance.md's table from it). About 15 minutes with 2 rounds on the
project's 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402  (beside this script)

STUDENT = ["--student-layers", "3", "--student-hidden", "384", "--student-heads", "12",
           "--student-intermediate", "1536", "--loss", "v2"]
T512 = ["--batch", "8", "--seq", "512", "--relation-heads", "48", "--steps", "2", "--warmup", "1"]
T2048 = ["--batch", "8", "--seq", "2048", "--random-teacher-layers", "6", "--relation-heads", "12",
         "--steps", "1", "--warmup", "1"]
MODERNBERT = os.path.join(record.ROOT, "minilm_jax", "teacher_configs", "answerdotai--ModernBERT-base")
T8192 = ["--teacher", MODERNBERT, "--random-teacher-layers", "22", "--student-layers", "6", "--student-heads",
         "6", "--student-intermediate", "576", "--batch", "1", "--seq", "8192", "--relation-heads", "12",
         "--steps", "2", "--warmup", "1"]  # later flags win: these replace the teacher and the student
# (shape, relation loss, bench arguments): the rows, in the order of the table.
ROWS = [
    ("8 × 512, A_r 48", "blockwise, 128 keys (the default)", T512),
    ("8 × 512, A_r 48", "one head at a time (`--chunk-heads 1`)", [*T512, "--chunk-heads", "1"]),
    ("8 × 2048, A_r 12, random 6-layer teacher", "blockwise, 128 keys (the default)", T2048),
    ("8 × 2048, A_r 12, random 6-layer teacher", "one head at a time (`--chunk-heads 1`)",
     [*T2048, "--chunk-heads", "1"]),
    ("8 × 2048, A_r 12, random 6-layer teacher", "direct (`--chunk-heads 12`), compiled only",
     [*T2048, "--chunk-heads", "12", "--compile-only"]),
    ("1 × 8192, A_r 12, random ModernBERT-base-shaped teacher (22×768) → 6×384 (6 heads, GeGLU FFN 576)",
     "blockwise, 128 keys (the default)", T8192),
]


def bench(teacher: str, args: list) -> dict:
  """The JSON line of one minilm_jax.bench run; RuntimeError with its last error line if it fails."""
  return record.run_json([sys.executable, "-m", "minilm_jax.bench", "--teacher", teacher, *STUDENT, *args])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--teacher", default="", help="default: the packaged all-MiniLM-L6-v2")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--rows", default="", help="comma list of row numbers (0-based) to run; default all")
  p.add_argument("--out", help="write every run and the provenance here (JSON lines)")
  a = p.parse_args(argv)
  if not a.teacher:
    from minilm_jax import hf
    a.teacher = hf.packaged_teacher_path()
  chosen = [int(i) for i in a.rows.split(",")] if a.rows else range(len(ROWS))
  prov = record.provenance("benchmarks/long_steps.py", argv)
  lines = []
  for round_ in range(a.rounds):
    for i in chosen:
      shape, path, args = ROWS[i]
      if "--compile-only" in args and round_:
        continue  # its memory analysis is the same every round
      lines.append({"row": i, "shape": shape, "relation_loss": path, "round": round_,
                    **bench(a.teacher, args)})
      print(json.dumps(lines[-1]), flush=True)
  if a.out:
    record.write_jsonl(a.out, lines + [{"row": "summary", "rounds": a.rounds, **prov}])


if __name__ == "__main__":
  main()
