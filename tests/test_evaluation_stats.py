"""evaluation.stats against scipy, numpy float64 and hand-computed values: ranks, Spearman, Pearson,
reciprocal ranks, paired differences (means, agreement, STS, fine-tuning) and the task metrics."""

import numpy as np
import pytest

from minilm_jax.evaluation.stats import (bootstrap_se, mean_se, paired_difference, pearson, rankdata,
                                         reciprocal_ranks, score, spearman)


def test_spearman_and_ranks_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  x = rng.integers(0, 8, 200).astype(float)  # many ties
  y = x + rng.normal(0, 3, 200)
  np.testing.assert_allclose(rankdata(x), stats.rankdata(x))
  assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
  assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_pearson_matches_numpy_in_float64():
  rng = np.random.default_rng(0)
  x = rng.normal(size=500).astype(np.float32)         # float32 cosines: computed in float64 all the same
  y = 3 * x + rng.normal(0, 2, 500)
  want = np.corrcoef(x.astype(np.float64), y)[0, 1]
  assert pearson(x, y) == pytest.approx(want, abs=1e-5)
  assert pearson(1e4 + x.astype(np.float64), y) == pytest.approx(want, abs=1e-5)  # far from 0: centred
  assert np.isnan(pearson(np.ones(5), np.arange(5.0)))


def test_paired_difference_of_sts_correlations_with_human_scores():
  rng = np.random.default_rng(3)
  gold = rng.uniform(0, 5, 400)
  a, b = gold + rng.normal(0, 1, 400), gold + rng.normal(0, 3, 400)
  for stat, f in (("spearman", spearman), ("pearson", pearson)):
    res = lambda x: {"value": f(x, gold), "statistic": stat, "items": x.tolist(), "gold": gold.tolist()}
    d = paired_difference(f"sts:x:{stat}", res(a), res(b), None, 300, 0)
    assert d["value"] == pytest.approx(f(a, gold) - f(b, gold), abs=1e-12)
    # The oracle: the same resamples, both models on each, written out here.
    idx = np.random.default_rng(0).integers(0, 400, (300, 400))
    want = np.std([np.corrcoef(*(np.stack([a[i], gold[i]]) if stat == "pearson" else
                                 np.stack([rankdata(a[i]), rankdata(gold[i])])))[0, 1] -
                   np.corrcoef(*(np.stack([b[i], gold[i]]) if stat == "pearson" else
                                 np.stack([rankdata(b[i]), rankdata(gold[i])])))[0, 1] for i in idx], ddof=1)
    assert d["se"] == pytest.approx(want, rel=1e-5) and d["z"] > 2
    # Other pairs (another file) are not compared.
    other = {**res(b), "gold": (gold + 1).tolist()}
    assert paired_difference(f"sts:x:{stat}", res(a), other, None, 50, 0) is None


def test_reciprocal_ranks_against_a_hand_made_set():
  c = np.eye(4)                                   # candidates: 4 orthogonal directions
  q = np.array([[1, 0, 0, 0], [1, .5, 0, 0], [0, 0, .2, 1], [1, 1, 1, 1.]])
  # query 0 -> its target 0 ranks 1st; query 1 -> target 1 ranks 2nd (after 0); query 2 -> target 2 is 2nd
  # (after 3); query 3 is equally close to all 4: the target ties with 3 others, rank 1 + 3/2.
  rr = reciprocal_ranks(q, c, np.array([0, 1, 2, 3]))
  np.testing.assert_allclose(rr, [1, 1 / 2, 1 / 2, 1 / 2.5])
  exclude = np.zeros((4, 4), bool)
  exclude[1, 0] = True                            # query 1 may not be ranked against candidate 0
  assert reciprocal_ranks(q, c, np.array([0, 1, 2, 3]), exclude)[1] == 1


def test_paired_difference_of_means_is_the_paired_t_statistic():
  from scipy import stats
  rng = np.random.default_rng(0)
  hard_N = rng.normal(0, 1, 400)  # what both models find hard: pairing cancels it
  a, b = 0.1 + hard_N + rng.normal(0, 0.2, 400), hard_N + rng.normal(0, 0.2, 400)
  d = paired_difference("retrieval_mrr", mean_se(a), mean_se(b), None, 50, 0)
  assert d["value"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
  assert d["z"] == pytest.approx(stats.ttest_rel(a, b).statistic, rel=1e-9)
  unpaired = np.hypot(mean_se(a)["se"], mean_se(b)["se"])
  assert d["se"] < unpaired / 3
  # Items of another length (another evaluation's probe) are not compared.
  assert paired_difference("retrieval_mrr", mean_se(a[:-1]), mean_se(b), None,
                           50, 0) is None


def test_paired_difference_of_agreement_against_the_teacher():
  rng = np.random.default_rng(1)
  t_P = rng.normal(size=600)
  m_P = t_P + rng.normal(0, 1.0, 600)
  teacher = {"value": 1.0, "se": 0.0, "items": t_P.tolist()}
  student = {"value": spearman(m_P, t_P), "items": m_P.tolist()}
  d = paired_difference("agreement", student, teacher, teacher, 400, 0)
  # The teacher agrees with itself on every resample: the difference's SE is the student's own.
  assert d["value"] == pytest.approx(student["value"] - 1)
  assert d["se"] == pytest.approx(bootstrap_se(spearman, m_P, t_P, 400, 0), rel=1e-9)
  assert paired_difference("agreement", student, teacher, None, 400, 0) is None


def finetune_result(pred_SN, y_N, metric="accuracy"):
  tests = [score(metric, y_N, p) for p in pred_SN]
  spread = float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0
  return {"value": float(np.mean(tests)), "spread": spread, "metric": metric, "test_labels": y_N.tolist(),
          "seeds": [{"test": t, "test_pred": p.tolist()} for t, p in zip(tests, pred_SN)]}


def test_paired_difference_of_fine_tuning_counts_items_and_seeds():
  rng = np.random.default_rng(2)
  y_N = rng.integers(0, 2, 1000)
  flip = lambda p, q: np.where(rng.random(len(p)) < q, 1 - p, p)
  base_N = flip(y_N, 0.25)                       # a model right on 75% of the items
  a = finetune_result(np.array([flip(base_N, 0.02)]), y_N)   # one seed: no spread
  b = finetune_result(np.array([flip(base_N, 0.10)]), y_N)
  d = paired_difference("nsp", a, b, None, 2000, 0)
  right_a, right_b = (np.array(a["seeds"][0]["test_pred"]) == y_N), (np.array(b["seeds"][0]["test_pred"]) == y_N)
  analytic = np.std(right_a * 1.0 - right_b, ddof=1) / np.sqrt(len(y_N))  # the paired SE of a mean
  assert d["value"] == pytest.approx(right_a.mean() - right_b.mean())
  assert d["se"] == pytest.approx(analytic, rel=0.1)
  # Seeds that disagree add their spread: sd²/seeds of each model on top of the items' part.
  a3 = finetune_result(np.array([flip(base_N, q) for q in (0.0, 0.05, 0.2)]), y_N)
  d3 = paired_difference("nsp", a3, b, None, 2000, 0)
  items_only = paired_difference("nsp", {**a3, "spread": 0.0}, b, None, 2000, 0)
  assert d3["se"] ** 2 == pytest.approx(items_only["se"] ** 2 + a3["spread"] ** 2 / 3, rel=1e-9)
  # Another metric is recomputed on each resample (F1 is not a mean over items).
  f = paired_difference("x", finetune_result(np.array([base_N]), y_N, "f1"),
                        finetune_result(np.array([flip(base_N, 0.1)]), y_N, "f1"), None, 200, 0)
  assert 0 < f["se"] < 0.05 and np.isfinite(f["z"])
  # Scored on other test items (another text's probe): not compared.
  other = finetune_result(np.array([base_N[:-1]]), y_N[:-1])
  assert paired_difference("nsp", a, other, None, 50, 0) is None
  # Equal models: a difference of 0 with SE 0 reads as 0 SE, not nan.
  assert paired_difference("nsp", a, a, None, 50, 0)["z"] == 0.0


def test_metrics_against_hand_computed_values():
  y = np.array([1, 1, 0, 0, 1, 0])
  p = np.array([1, 0, 0, 1, 1, 0])
  assert score("accuracy", y, p) == pytest.approx(4 / 6)
  assert score("f1", y, p) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))   # tp 2, fp 1, fn 1
  assert score("matthews", y, p) == pytest.approx((2 * 2 - 1 * 1) / 9)  # (tp tn - fp fn)/sqrt(3^4)
