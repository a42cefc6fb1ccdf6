"""evaluation.report: which models a table compares, and the table's note on the last epoch."""

import numpy as np
import pytest

from minilm_jax.evaluation import report, stats


def test_comparisons_pair_each_student_with_every_model_and_the_teacher_with_the_baselines():
  row = lambda v: {"retrieval_mrr": stats.mean_se(np.full(10, v) + np.arange(10) / 100)}
  results = {"teacher": row(0.5), "student: a": row(0.4), "student: b": row(0.3),
             "baseline: random init": row(0.1), "baseline: first teacher layers": row(0.2)}
  c = report.comparisons(results, 10, 0)
  assert list(c) == ["student: a − teacher", "student: a − student: b", "student: a − baseline: random init",
                     "student: a − baseline: first teacher layers", "student: b − teacher",
                     "student: b − student: a", "student: b − baseline: random init",
                     "student: b − baseline: first teacher layers", "teacher − baseline: random init",
                     "teacher − baseline: first teacher layers"]
  assert c["student: a − baseline: random init"]["retrieval_mrr"]["value"] == pytest.approx(0.3)
  assert c["student: a − baseline: random init"]["retrieval_mrr"]["z"] > 1e6  # the items' noise cancels


def test_the_table_says_when_every_seed_chose_the_last_epoch(tmp_path):
  grid = lambda best: [{"lr": 2e-4, "epoch": e, "dev": 0.5 + 0.1 * (e == best)} for e in (1, 2, 3)]
  ft = lambda *best: {"value": 0.7, "spread": 0.01, "se": 0.006, "n": 10,
                      "seeds": [{"seed": i, "lr": 2e-4, "epoch": b, "dev": 0.6, "test": 0.7, "dev_grid": grid(b)}
                                for i, b in enumerate(best)]}
  row = lambda nsp, package: {"layers": 3, "hidden": 8, "params_M": 1.0, "retrieval_mrr": {"value": 0.2, "se": 0.01},
                              "nsp": nsp, "package": package}
  results = {"teacher": row(ft(3, 3, 3), ft(3, 2, 3)), "student": row(ft(2, 3, 3), ft(3, 3, 3))}
  assert report.last_epoch_everywhere(results) == ["teacher: nsp", "student: package"]
  md = tmp_path / "results.md"
  report.write_table(results, report.metrics_of(results), 3, str(md))
  assert md.read_text().strip().endswith("a larger --epochs tells): teacher: nsp; student: package.")
  results["teacher"]["nsp"], results["student"]["package"] = ft(3, 2, 3), ft(1, 3, 3)
  report.write_table(results, report.metrics_of(results), 3, str(md))
  assert "last epoch" not in md.read_text()


def test_sts_metrics_are_zero_shot_columns_with_their_truncation_noted(tmp_path):
  m = "sts:pairs.csv:spearman"
  assert report.label(m) == "STS pairs.csv: Spearman with human scores" and not report.is_finetune(m)
  assert report.label("sts:glue:stsb:pearson") == "STS glue:stsb: Pearson with human scores"
  sts = lambda cut: {"value": 0.5, "se": 0.01, "n": 40, "truncated": cut, "max_len": 256}
  results = {"teacher": {"layers": 6, "hidden": 8, "params_M": 1.0, m: sts(3)},
             "student": {"layers": 3, "hidden": 8, "params_M": 1.0, m: sts(3)}}
  md = tmp_path / "results.md"
  report.write_table(results, report.metrics_of(results), 3, str(md))
  text = md.read_text()
  assert "| STS pairs.csv: Spearman with human scores (± SE) |" in text
  assert text.strip().endswith("embedded from its first tokens: pairs.csv: 3 of 40 pairs (cut to 256 tokens).")
  results["teacher"][m] = results["student"][m] = sts(0)
  report.write_table(results, report.metrics_of(results), 3, str(md))
  assert "first tokens" not in md.read_text()
