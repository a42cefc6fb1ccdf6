"""evaluation.subsets: the search over subsets of teacher layers (every subset, or a beam search, both
with a fake scorer), and the choice on a tiny teacher that reads the dev split only, never the test
probe; the same choice on a run's training corpus for student.init "best"."""

import itertools

import numpy as np
import pytest

from minilm_jax import hf
from minilm_jax.evaluation import probes, subsets
from minilm_jax.evaluation.protocol import Protocol
from conftest import tiny_config


def test_neighbours_move_one_layer_one_place_keeping_the_order():
  assert sorted(subsets.neighbours((0, 2, 4), 6)) == [(0, 1, 4), (0, 2, 3), (0, 2, 5), (0, 3, 4), (1, 2, 4)]
  assert subsets.neighbours((0, 1, 2), 3) == []


def test_every_subset_is_scored_where_there_are_few():
  seen = []
  def score(s):
    seen.append(s)
    return -abs(sum(s) - 9) - 0.01 * s[0]   # best: sum 9 with the lowest first layer, (0, 4, 5)
  best, scored, how = subsets.search(score, 6, 3, starts=[(0, 2, 4)], exhaustive=20)
  assert how == "every subset" and seen == list(itertools.combinations(range(6), 3)) and len(scored) == 20
  assert best == (0, 4, 5)
  # One more subset than the threshold allows: the beam search instead.
  assert subsets.search(score, 6, 3, starts=[(0, 2, 4)], exhaustive=19)[2] == "beam search"


def test_the_beam_search_finds_a_separable_optimum_within_its_budget():
  want = (1, 5, 6, 11, 15, 22)        # 24 → 6 layers: C(24, 6) = 134,596 subsets, far too many to score
  calls = []
  def score(s):
    calls.append(s)
    return -sum(abs(a - b) for a, b in zip(s, want))
  starts = [list(range(6)), *[[o + 4 * i for i in range(6)] for o in range(4)]]
  best, scored, how = subsets.search(score, 24, 6, starts, exhaustive=100, beam=4, budget=400)
  assert how == "beam search" and best == want and len(calls) == len(set(calls)) == len(scored) <= 400
  assert all(list(s) == sorted(set(s)) and 0 <= s[0] and s[-1] < 24 for s in scored)
  # The budget bounds the cost: it stops there, with the best it has seen.
  best, scored, _ = subsets.search(score, 24, 6, starts, exhaustive=100, beam=4, budget=30)
  assert len(scored) == 30 and scored[best] == max(scored.values())
  # A flat score: the first round brings nothing into the beam, and the search stops.
  _, scored, _ = subsets.search(lambda s: 0.0, 24, 6, starts, exhaustive=100, beam=2, budget=400)
  assert len(scored) < 5 + 2 * 12 + 1


@pytest.fixture(scope="module")
def tiny(tiny_teacher):
  from transformers import AutoTokenizer
  tcfg, tparams = hf.load_pretrained(tiny_teacher)
  return (tcfg, tparams), tcfg.resized(1, 16, 2, 32, 0.0), AutoTokenizer.from_pretrained(tiny_teacher)


def test_the_choice_reads_the_dev_split_only_never_the_test_probe(tiny, monkeypatch):
  teacher, scfg, tok = tiny
  words = "alpha beta gamma delta omega kappa sigma theta".split()
  rng = np.random.default_rng(0)
  docs = [" ".join(f"{' '.join(rng.choice(words, 5))} number {d} {i}." for i in range(8)) for d in range(40)]
  p = Protocol(queries=100, pairs=100, dev_queries=40)
  test = probes.probe_text(docs, p.queries, p.pairs, p.seed)
  dev = probes.probe_text(docs, p.dev_queries, 2 * p.dev_queries, p.seed + 1, set(test.sentences))
  assert not set(dev.sentences) & set(test.sentences) and len(dev.query_N) == 40
  read = []
  embed = probes.embed
  monkeypatch.setattr(probes, "embed", lambda *a, **k: read.extend(a[3]) or embed(*a, **k))
  record, params = subsets.choose(teacher, scfg, tok, ("mean", False), dev, p, 0)
  assert read and set(read) <= set(dev.sentences)          # the teacher's and every subset's embeddings
  assert record["how"] == "every subset" and record["subsets"] == 2 and len(record["scored"]) == 2
  assert record["dev"] == {"queries": 40, "pairs": len(dev.pairs_P2), "sentences": len(dev.sentences)}
  best = max(record["scored"], key=lambda x: x["score"])
  assert record["layers"] == best["layers"] and best["score"] == pytest.approx(best["retrieval"] + best["agreement"])
  k = record["layers"][0]
  np.testing.assert_array_equal(params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
                                teacher[1]["encoder"]["layer"][str(k)]["attention"]["self"]["query"]["kernel"][:16, :16])


def test_best_for_training_is_chosen_on_the_training_corpus(tiny, tiny_teacher, tmp_path):
  teacher, scfg, _ = tiny
  words = "alpha beta gamma delta omega kappa".split()
  rng = np.random.default_rng(1)
  corpus = tmp_path / "train.txt"
  corpus.write_text("\n\n".join(" ".join(f"{' '.join(rng.choice(words, 5))} line {i}." for i in range(6))
                                for _ in range(30)))
  cfg = tiny_config(tiny_teacher, str(corpus), **{"student.init": "best"})
  record = subsets.choose_for_training(cfg, tiny_teacher, teacher, scfg, Protocol(dev_queries=30))
  assert record["layers"] in ([0], [1]) and record["dev"]["queries"] == 30
  short = tmp_path / "short.txt"
  short.write_text("One sentence only here.")
  with pytest.raises(ValueError, match="fewer than 20 pairs of consecutive sentences: give the layers instead"):
    subsets.choose_for_training(tiny_config(tiny_teacher, str(short)), tiny_teacher, teacher, scfg)
