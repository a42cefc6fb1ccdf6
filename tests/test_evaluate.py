"""Evaluation: the next-sentence probe, metrics, fine-tuning, and a whole run's table with baselines."""

import csv
import json
import os

import numpy as np
import pytest

from minilm_jax import evaluate, hf, train
from conftest import tiny_config


def test_nsp_pairs_are_balanced_and_honest():
  docs = [f"Doc {d} sentence one is here. Doc {d} sentence two is here. Doc {d} sentence three is here."
          for d in range(30)]
  a, b, y = evaluate.nsp_pairs(docs, seed=0)
  assert len(a) == len(b) == len(y) == 120
  assert y.mean() == 0.5
  for sa, sb, label in zip(a, b, y):
    same_doc = sa.split()[1] == sb.split()[1]
    nxt = {"one": "two", "two": "three"}[sa.split()[3]]
    assert (label == 1) == (same_doc and sb.split()[3] == nxt)


def test_metrics_against_hand_computed_values():
  y = np.array([1, 1, 0, 0, 1, 0])
  p = np.array([1, 0, 0, 1, 1, 0])
  assert evaluate.score("accuracy", y, p) == pytest.approx(4 / 6)
  assert evaluate.score("f1", y, p) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))   # tp 2, fp 1, fn 1
  assert evaluate.score("matthews", y, p) == pytest.approx((2 * 2 - 1 * 1) / 9)  # (tp tn - fp fn)/sqrt(3^4)


def test_finetune_learns_a_separable_task(tiny_teacher, tmp_path):
  from transformers import AutoTokenizer
  path = tmp_path / "task.csv"
  rng = np.random.default_rng(0)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    for i in range(300):
      pos = i % 2 == 0
      w.writerow([" ".join(rng.choice(list("abc" if pos else "xyz"), 12)), "yes" if pos else "no"])
  task = evaluate.load_task(f"{path}:text,label")
  assert len(task.train[0]) == 240 and len(task.test[0]) == 60 and task.train[1] is None
  config, params = hf.load_pretrained(tiny_teacher)
  acc = evaluate.finetune(config, params, AutoTokenizer.from_pretrained(tiny_teacher), task, lr=1e-3,
                          epochs=3, max_len=32)
  assert acc > 0.9


def test_bad_task_file_columns(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"sentence": "x", "label": 1}) + "\n")
  with pytest.raises(ValueError, match="no column 'text'"):
    evaluate.load_task(f"{path}:text,label")


def test_evaluate_run_has_every_model_and_baseline_and_a_curve(tiny_teacher, tiny_corpus, tmp_path):
  w = str(tmp_path / "run")
  c = tiny_config(tiny_teacher, tiny_corpus, steps=4, checkpoint_every=1, keep_checkpoints=1, keep_every=2)
  train.train_and_evaluate(c, w, progress=False, log=lambda m: None)
  results = evaluate.evaluate_run(w, ["nsp"], lrs=[1e-3], epochs=[1], log=lambda m: None)
  assert set(results) == {"teacher", "student (distilled)", "baseline: random init",
                          "baseline: first teacher layers", "baseline: every k-th teacher layer"}
  for name, row in results.items():
    assert 0.0 <= row["nsp"] <= 1.0 and row["encode_tokens_per_s"] > 0
    if name != "teacher":
      assert np.isfinite(row["heldout_relation_loss"]) and row["heldout_relation_loss"] >= 0
  assert results["teacher"]["layers"] == 2 and results["student (distilled)"]["layers"] == 1
  for name in ("results.json", "results.md", "results.png"):
    assert os.path.isfile(os.path.join(w, "eval", name))
  table = open(os.path.join(w, "eval", "results.md")).read()
  assert "baseline: random init" in table and "heldout_relation_loss" in table

  with pytest.raises(ValueError, match="same grid"):
    evaluate.evaluate_curve(w, ["nsp"], lrs=[2e-3], epochs=[1], log=lambda m: None)
  curve = evaluate.evaluate_curve(w, ["nsp"], lrs=[1e-3], epochs=[1], log=lambda m: None)
  assert sorted(curve) == [2, 4]  # the kept checkpoints: every 2nd step, and the latest
  assert curve[2]["tokens"] == 2 * 8 * 32
  # The last checkpoint holds the exported student's params: the same scores as in the table.
  final = results["student (distilled)"]
  assert curve[4]["heldout_relation_loss"] == pytest.approx(final["heldout_relation_loss"], rel=1e-6)
  assert curve[4]["nsp"] == pytest.approx(final["nsp"], abs=1e-6)
  assert curve[2]["heldout_relation_loss"] != pytest.approx(final["heldout_relation_loss"], rel=1e-6)
  for name in ("curve.json", "curve.png"):
    assert os.path.isfile(os.path.join(w, "eval", name))


def test_minilm_eval_on_a_folder_that_is_not_a_run(tmp_path):
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-c", "from minilm_jax.cli import eval_main; eval_main()",
                      "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip() == f"minilm-eval: error: {tmp_path}: no checkpoint; is this a minilm-distill workdir?"
  assert os.listdir(tmp_path) == []  # nothing created
