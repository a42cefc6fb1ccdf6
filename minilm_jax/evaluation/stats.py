"""The statistics behind every number minilm-eval reports, numpy only: ranks, Spearman and Pearson
correlation, the bootstrap, per-item means with their SE, paired differences between two models scored on the same items,
ranking by cosine, and the task metrics (accuracy, F1, Matthews)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def rankdata(x_N: np.ndarray) -> np.ndarray:
  """1-based ranks, ties given their average rank (as scipy.stats.rankdata)."""
  _, inv, counts = np.unique(x_N, return_inverse=True, return_counts=True)
  avg = np.cumsum(counts) - (counts - 1) / 2
  return avg[inv.reshape(-1)]


def spearman(x_N: np.ndarray, y_N: np.ndarray) -> float:
  """Pearson correlation of the ranks; nan when either side is constant."""
  rx, ry = rankdata(x_N) - (len(x_N) + 1) / 2, rankdata(y_N) - (len(y_N) + 1) / 2
  den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
  return float((rx * ry).sum() / den) if den > 0 else float("nan")


def pearson(x_N: np.ndarray, y_N: np.ndarray) -> float:
  """Pearson correlation in float64; nan when either side is constant."""
  x_N, y_N = np.asarray(x_N, np.float64), np.asarray(y_N, np.float64)
  dx, dy = x_N - x_N.mean(), y_N - y_N.mean()
  den = np.sqrt((dx * dx).sum() * (dy * dy).sum())
  return float((dx * dy).sum() / den) if den > 0 else float("nan")


CORRELATIONS = {"spearman": spearman, "pearson": pearson}


def bootstrap_se(stat, x_N: np.ndarray, y_N: np.ndarray, reps: int, seed: int) -> float:
  """Standard error of stat(x, y) by resampling the N pairs with replacement `reps` times."""
  return bootstrap(lambda i: stat(x_N[i], y_N[i]), len(x_N), reps, seed)


def bootstrap(stat_of, n: int, reps: int, seed: int) -> float:
  """sd of stat_of(idx_N) over `reps` resamples idx_N of range(n) with replacement."""
  idx_RN = np.random.default_rng(seed).integers(0, n, (reps, n))
  return float(np.std([stat_of(i) for i in idx_RN], ddof=1))


def mean_se(x_N) -> dict:
  """Mean and SE of per-item values, kept as "items" so that two models scored on the same items can be
  compared pairwise (paired_difference)."""
  x_N = np.asarray(x_N, np.float64)
  return {"value": float(x_N.mean()), "se": float(x_N.std(ddof=1) / np.sqrt(len(x_N))), "n": len(x_N),
          "items": x_N.tolist()}


def score(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
  """A task's metric ("accuracy", "f1" or "matthews") of predictions pred_N against labels y_N."""
  if metric == "accuracy":
    return float((y == pred).mean())
  if metric == "f1":
    tp, fp, fn = ((pred == 1) & (y == 1)).sum(), ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum()
    return float(2 * tp / max(2 * tp + fp + fn, 1))
  tp, tn = ((pred == 1) & (y == 1)).sum(), ((pred == 0) & (y == 0)).sum()
  fp, fn = ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum()
  den = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  return float((tp * tn - fp * fn) / den) if den else 0.0


def paired_difference(metric: str, a: dict, b: dict, teacher: Optional[dict], reps: int, seed: int
                      ) -> Optional[dict]:
  """a − b for one metric of two models scored on the same items, with the SE of that difference over
  the items (paired: what both models find hard cancels), or None when either lacks its items.
  - a mean over items (retrieval, the linear probe, the held-out loss): SE of the mean per-item difference;
  - agreement (a Spearman correlation with the teacher's cosines, `teacher`'s items) and a correlation
    with human scores (an STS probe: its result holds the scores as "gold" and its "statistic"): by
    bootstrap over the pairs, both models on the same resample;
  - fine-tuning: by bootstrap over the test items of the seed-averaged score difference, plus each model's
    spread over seeds (sd²/seeds), which the items do not see. That counts the item-by-seed noise twice,
    so the SE errs large; the seeds alone, the table's ± sd, ignore that the test items are a sample."""
  if "seeds" in a and "seeds" in b:
    if a.get("test_labels") is None or a["test_labels"] != b.get("test_labels"):
      return None  # not scored on the same test items
    y_N = np.asarray(a["test_labels"])
    pa_SN = np.array([s["test_pred"] for s in a["seeds"]])
    pb_SN = np.array([s["test_pred"] for s in b["seeds"]])
    mean_score = lambda p_SN, i: np.mean([score(a["metric"], y_N[i], p[i]) for p in p_SN])
    items_se = bootstrap(lambda i: mean_score(pa_SN, i) - mean_score(pb_SN, i), len(y_N), reps, seed)
    seed_var = sum(x["spread"] ** 2 / len(x["seeds"]) for x in (a, b))
    return difference(a["value"] - b["value"], math.sqrt(items_se ** 2 + seed_var), len(y_N))
  if "items" not in a or "items" not in b or len(a["items"]) != len(b["items"]):
    return None
  xa_N, xb_N = np.asarray(a["items"], np.float64), np.asarray(b["items"], np.float64)
  if metric == "agreement" or "gold" in a:
    if "gold" in a:
      if a["gold"] != b.get("gold") or a.get("statistic") != b.get("statistic"):
        return None  # not scored on the same pairs
      ref, corr = a["gold"], CORRELATIONS[a["statistic"]]
    elif teacher is None or "items" not in teacher:
      return None
    else:
      ref, corr = teacher["items"], spearman
    r_N = np.asarray(ref, np.float64)
    diff = lambda i: corr(xa_N[i], r_N[i]) - corr(xb_N[i], r_N[i])
    return difference(a["value"] - b["value"], bootstrap(diff, len(r_N), reps, seed), len(r_N))
  d_N = xa_N - xb_N
  return difference(float(d_N.mean()), float(d_N.std(ddof=1) / np.sqrt(len(d_N))), len(d_N))


def difference(d: float, se: float, n: int) -> dict:
  """A difference d over n items with its SE, and d in SEs (z; ±inf for a nonzero d with SE 0)."""
  z = d / se if se > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
  return {"value": d, "se": se, "n": n, "z": z}


def cosines(a_ND: np.ndarray, b_MD: np.ndarray) -> np.ndarray:
  """s_NM: the cosine of every row of a_ND with every row of b_MD (a zero row has cosine 0)."""
  unit = lambda e: e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  return unit(a_ND) @ unit(b_MD).T


def reciprocal_ranks(q_ND: np.ndarray, c_MD: np.ndarray, target_N: np.ndarray,
                     exclude_NM: Optional[np.ndarray] = None) -> np.ndarray:
  """1/rank of each query's target among the candidates by cosine; ties with the target count half (a
  model that gives every sentence the same vector gets the rank of a random guess, not 1).
  exclude_NM: candidates a query must not be ranked against (itself)."""
  s_NM = np.nan_to_num(cosines(q_ND, c_MD), nan=-np.inf)  # a NaN embedding never ranks first
  n = np.arange(len(target_N))
  t_N1 = s_NM[n, target_N][:, None]
  keep_NM = np.ones_like(s_NM, bool) if exclude_NM is None else ~exclude_NM
  keep_NM[n, target_N] = False  # the target itself
  rank_N = 1 + ((s_NM > t_N1) & keep_NM).sum(1) + 0.5 * ((s_NM == t_N1) & keep_NM).sum(1)
  return 1.0 / rank_N
