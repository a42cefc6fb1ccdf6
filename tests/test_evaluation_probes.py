"""evaluation.probes: the probe text, retrieval, agreement and the linear probe on hand-made embeddings."""

import numpy as np
import pytest

from minilm_jax.evaluation import probes


def test_probe_text_pairs_are_consecutive_and_retrieval_is_sane():
  docs = [" ".join(f"Document {d} has sentence number {i}." for i in range(6)) for d in range(40)]
  p = probes.probe_text(docs, queries=100, pairs=120, seed=0)
  assert len(p.query_N) == 100 and len(p.pairs_P2) <= 120 and len(set(p.sentences)) == len(p.sentences)
  for q, t in zip(p.query_N, p.target_N):
    a, b = p.sentences[q].split(), p.sentences[p.cand_M[t]].split()
    assert a[1] == b[1] and int(b[-1][:-1]) == int(a[-1][:-1]) + 1
  rng = np.random.default_rng(0)
  assert probes.retrieval(rng.normal(size=(len(p.sentences), 64)), p)["value"] < 0.2  # noise: ~ln(M)/M
  with pytest.raises(ValueError, match="at least 20"):
    probes.probe_text(["One two three four. Five six seven eight."], 10, 10, 0)


def test_retrieval_excludes_the_query_itself_from_its_candidates():
  # Documents A. B. C.: queries A and B, candidates B and C. Embeddings v, v + u, v + 2u: each query's
  # successor is its nearest other sentence, so MRR is 1 only if query B is not ranked against itself.
  docs = [f"Doc {d} sentence alpha here. Doc {d} sentence beta here. Doc {d} sentence gamma here."
          for d in range(15)]
  p = probes.probe_text(docs, queries=100, pairs=10, seed=0)
  assert len(p.query_N) == 30
  rng = np.random.default_rng(0)
  v, u = rng.normal(size=(15, 64)), 0.1 * rng.normal(size=(15, 64))
  step = {"alpha": 0, "beta": 1, "gamma": 2}
  e = np.stack([v[int(s.split()[1])] + step[s.split()[3]] * u[int(s.split()[1])] for s in p.sentences])
  r = probes.retrieval(e, p)
  assert r["value"] == 1.0 and r["n"] == 30


def test_agreement_is_one_with_itself_and_its_se_shrinks_with_n():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(400, 16))
  e = t + rng.normal(0, 1.0, t.shape)
  se = {}
  for n in (100, 1600):
    p = probes.ProbeText([""] * 400, None, None, None, rng.integers(0, 400, (n, 2)))
    assert probes.agreement(t, t, p, 50, 0)["value"] == pytest.approx(1.0)
    a = probes.agreement(e, t, p, 100, 0)
    assert 0 < a["value"] < 1
    se[n] = a["se"]
  assert 0 < se[1600] < se[100] / 2


def test_linear_probe_learns_a_separable_toy_set():
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 3, (5, 8))
  def part(n):
    y = rng.integers(0, 5, n)
    return centres[y] + rng.normal(size=(n, 8)), y
  r = probes.linear_probe(part(200), part(50), part(100))
  assert r["value"] > 0.95 and r["se"] == pytest.approx(np.sqrt(r["value"] * (1 - r["value"]) / 100))
  assert r["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)


def test_sts_correlates_cosines_with_human_scores_as_scipy_does():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
  b[:150] += 2 * a[:150]                            # half the pairs alike
  cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)   # float64 oracle
  gold = np.round(cos * 2 + rng.normal(0, 0.5, 300), 1)  # ties, as human ratings have
  r = probes.sts(a.astype(np.float32), b.astype(np.float32), gold, 100, 0)
  assert r["spearman"]["value"] == pytest.approx(stats.spearmanr(cos, gold).statistic, abs=1e-5)
  assert r["pearson"]["value"] == pytest.approx(stats.pearsonr(cos, gold).statistic, abs=1e-5)
  np.testing.assert_allclose(r["pearson"]["items"], cos, atol=1e-5)
  assert r["pearson"]["gold"] == gold.tolist() and r["spearman"]["n"] == 300
  assert 0 < r["spearman"]["se"] < 0.1 and 0 < r["pearson"]["se"] < 0.1


def test_truncated_pairs_counts_pairs_with_a_text_over_the_limit(tiny_teacher):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tiny_teacher)   # one token a character, plus [CLS] and [SEP]
  a = ["abcdef", "ab", "abcdefgh"]                   # 8, 4 and 10 tokens
  b = ["ab", "abcdefgh", "ab"]
  assert probes.truncated_pairs(tok, a, b, 8) == 2 and probes.truncated_pairs(tok, a, b, 10) == 0
