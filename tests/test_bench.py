"""bench.py, the step benchmark: a random teacher of another depth builds and compiles (ModernBERT's layer
pattern follows the depth)."""

import os

from minilm_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODERNBERT = os.path.join(ROOT, "minilm_jax", "teacher_configs", "answerdotai--ModernBERT-base")


def test_a_random_modernbert_teacher_of_another_depth_compiles():
  args = bench.parse_args(["--teacher", MODERNBERT, "--random-teacher-layers", "4", "--student-layers", "2",
                           "--student-hidden", "64", "--student-heads", "4", "--student-intermediate", "128",
                           "--batch", "2", "--seq", "64", "--relation-heads", "4", "--steps", "1",
                           "--compile-only"])
  r = bench.run(args)
  assert r["compiled_memory_bytes"] > 0 and r["batch"] == 2 and r["seq"] == 64
