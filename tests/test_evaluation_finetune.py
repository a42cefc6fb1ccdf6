"""evaluation.finetune: the protocol chooses on dev and reads test once per seed."""

import csv

import numpy as np
import pytest

from minilm_jax import hf
from minilm_jax.evaluation import finetune, stats, tasks


def test_finetune_chooses_on_dev_and_reads_test_once_per_seed(tiny_teacher, tmp_path, monkeypatch):
  from transformers import AutoTokenizer
  path = tmp_path / "task.csv"
  rng = np.random.default_rng(0)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    for i in range(200):
      pos = i % 2 == 0
      w.writerow([" ".join(rng.choice(list("abc" if pos else "xyz"), 12)), "yes" if pos else "no"])
  task = tasks.load_task(f"{path}:text,label")
  assert len(task.train[0]) == 160 and len(task.test[0]) == 40 and task.train[1] is None
  reads = []
  score = stats.score
  monkeypatch.setattr(stats, "score", lambda m, y, p: reads.append(y is task.test[2]) or score(m, y, p))
  config, params = hf.load_pretrained(tiny_teacher)
  r = finetune.finetune(config, params, AutoTokenizer.from_pretrained(tiny_teacher), task,
                        lrs=(1e-4, 1e-3), epochs=3, seeds=2, max_len=32)
  assert reads.count(True) == 2                          # test read once per seed, after choosing
  assert len(reads) == 2 * (2 * 3 + 1)                   # dev after each of 3 epochs for 2 lrs, + test
  for s in r["seeds"]:
    grid = s["dev_grid"]
    assert len(grid) == 6
    best = max(grid, key=lambda g: g["dev"])             # the first of equals, as the protocol keeps
    assert (s["lr"], s["epoch"], s["dev"]) == (best["lr"], best["epoch"], best["dev"])
  tests = [s["test"] for s in r["seeds"]]
  assert r["value"] == pytest.approx(np.mean(tests)) and r["spread"] == pytest.approx(np.std(tests, ddof=1))
  assert r["se"] == pytest.approx(r["spread"] / np.sqrt(2))
  assert (r["n"], r["n_train"]) == (40, 160)             # train and dev together, as the task gave them
  assert r["value"] > 0.9
