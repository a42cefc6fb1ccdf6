"""Evaluation: probes against independent oracles, the package task, the fine-tuning protocol, and whole
runs (one or several) with baselines, read-only."""

import csv
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from minilm_jax import checkpoint, evaluate, hf, objective, train
from conftest import tiny_config

# Small enough for tiny models in seconds; the protocol is the same as the default's.
TINY = evaluate.Protocol(queries=150, pairs=300, bootstrap=50, package_classes=12, package_per_class=10,
                         seeds=2, lrs=(1e-3,), epochs=1, nsp_train=40, nsp_test=32, finetune_len=32)
held = lambda d: int(hashlib.sha1(d.encode()).hexdigest(), 16) % 5 == 0


def fake_site_packages(root, packages=13, docs_per_package=40):
  """`packages` packages of docstrings in their own words, a vendored docstring in two of them, a tests
  folder and a dist-info folder (both ignored)."""
  rng = np.random.default_rng(0)
  shared = "Vendored helper shared by two packages. " + "same words " * 30
  for k in range(packages):
    pkg = root / f"pkg{k}"
    (pkg / "tests").mkdir(parents=True)
    words = [f"{w}{k}" for w in ("alpha", "beta", "gamma", "delta", "omega")]
    body = "".join(f'def f{i}():\n  """Doc {i} of pkg{k}: {" ".join(rng.choice(words, 40))}."""\n\n'
                   for i in range(docs_per_package))
    (pkg / "mod.py").write_text(body + (f'def v():\n  """{shared}"""\n' if k < 2 else ""))
    (pkg / "tests" / "test_x.py").write_text('"""' + "test prose " * 30 + '"""\n')
  (root / "pkg0-1.0.dist-info").mkdir()
  return [str(root)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  return fake_site_packages(tmp_path_factory.mktemp("site"))


def train_run(teacher, corpus, workdir, **overrides):
  c = tiny_config(teacher, corpus, **{"steps": 4, "checkpoint_every": 1, "keep_checkpoints": 1,
                                      "keep_every": 2, **overrides})
  train.train_and_evaluate(c, workdir, progress=False, log=lambda m: None)
  return workdir


# --- Statistics and zero-shot probes ---------------------------------------------------------------------

def test_spearman_and_ranks_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  x = rng.integers(0, 8, 200).astype(float)  # many ties
  y = x + rng.normal(0, 3, 200)
  np.testing.assert_allclose(evaluate.rankdata(x), stats.rankdata(x))
  assert evaluate.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
  assert np.isnan(evaluate.spearman(np.ones(5), np.arange(5.0)))


def test_reciprocal_ranks_against_a_hand_made_set():
  c = np.eye(4)                                   # candidates: 4 orthogonal directions
  q = np.array([[1, 0, 0, 0], [1, .5, 0, 0], [0, 0, .2, 1], [1, 1, 1, 1.]])
  # query 0 -> its target 0 ranks 1st; query 1 -> target 1 ranks 2nd (after 0); query 2 -> target 2 is 2nd
  # (after 3); query 3 is equally close to all 4: the target ties with 3 others, rank 1 + 3/2.
  rr = evaluate.reciprocal_ranks(q, c, np.array([0, 1, 2, 3]))
  np.testing.assert_allclose(rr, [1, 1 / 2, 1 / 2, 1 / 2.5])
  exclude = np.zeros((4, 4), bool)
  exclude[1, 0] = True                            # query 1 may not be ranked against candidate 0
  assert evaluate.reciprocal_ranks(q, c, np.array([0, 1, 2, 3]), exclude)[1] == 1


def test_probe_text_pairs_are_consecutive_and_retrieval_is_sane():
  docs = [" ".join(f"Document {d} has sentence number {i}." for i in range(6)) for d in range(40)]
  p = evaluate.probe_text(docs, queries=100, pairs=120, seed=0)
  assert len(p.query_N) == 100 and len(p.pairs_P2) <= 120 and len(set(p.sentences)) == len(p.sentences)
  for q, t in zip(p.query_N, p.target_N):
    a, b = p.sentences[q].split(), p.sentences[p.cand_M[t]].split()
    assert a[1] == b[1] and int(b[-1][:-1]) == int(a[-1][:-1]) + 1
  rng = np.random.default_rng(0)
  assert evaluate.retrieval(rng.normal(size=(len(p.sentences), 64)), p)["value"] < 0.2  # noise: ~ln(M)/M
  with pytest.raises(ValueError, match="at least 20"):
    evaluate.probe_text(["One two three four. Five six seven eight."], 10, 10, 0)


def test_retrieval_excludes_the_query_itself_from_its_candidates():
  # Documents A. B. C.: queries A and B, candidates B and C. Embeddings v, v + u, v + 2u: each query's
  # successor is its nearest other sentence, so MRR is 1 only if query B is not ranked against itself.
  docs = [f"Doc {d} sentence alpha here. Doc {d} sentence beta here. Doc {d} sentence gamma here."
          for d in range(15)]
  p = evaluate.probe_text(docs, queries=100, pairs=10, seed=0)
  assert len(p.query_N) == 30
  rng = np.random.default_rng(0)
  v, u = rng.normal(size=(15, 64)), 0.1 * rng.normal(size=(15, 64))
  step = {"alpha": 0, "beta": 1, "gamma": 2}
  e = np.stack([v[int(s.split()[1])] + step[s.split()[3]] * u[int(s.split()[1])] for s in p.sentences])
  r = evaluate.retrieval(e, p)
  assert r["value"] == 1.0 and r["n"] == 30


def test_agreement_is_one_with_itself_and_its_se_shrinks_with_n():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(400, 16))
  e = t + rng.normal(0, 1.0, t.shape)
  se = {}
  for n in (100, 1600):
    p = evaluate.ProbeText([""] * 400, None, None, None, rng.integers(0, 400, (n, 2)))
    assert evaluate.agreement(t, t, p, 50, 0)["value"] == pytest.approx(1.0)
    a = evaluate.agreement(e, t, p, 100, 0)
    assert 0 < a["value"] < 1
    se[n] = a["se"]
  assert 0 < se[1600] < se[100] / 2


# --- Tasks ----------------------------------------------------------------------------------------------

def test_paired_difference_of_means_is_the_paired_t_statistic():
  from scipy import stats
  rng = np.random.default_rng(0)
  hard_N = rng.normal(0, 1, 400)  # what both models find hard: pairing cancels it
  a, b = 0.1 + hard_N + rng.normal(0, 0.2, 400), hard_N + rng.normal(0, 0.2, 400)
  d = evaluate.paired_difference("retrieval_mrr", evaluate._mean_se(a), evaluate._mean_se(b), None, 50, 0)
  assert d["value"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
  assert d["z"] == pytest.approx(stats.ttest_rel(a, b).statistic, rel=1e-9)
  unpaired = np.hypot(evaluate._mean_se(a)["se"], evaluate._mean_se(b)["se"])
  assert d["se"] < unpaired / 3
  # Items of another length (another evaluation's probe) are not compared.
  assert evaluate.paired_difference("retrieval_mrr", evaluate._mean_se(a[:-1]), evaluate._mean_se(b), None,
                                    50, 0) is None


def test_paired_difference_of_agreement_against_the_teacher():
  rng = np.random.default_rng(1)
  t_P = rng.normal(size=600)
  m_P = t_P + rng.normal(0, 1.0, 600)
  teacher = {"value": 1.0, "se": 0.0, "items": t_P.tolist()}
  student = {"value": evaluate.spearman(m_P, t_P), "items": m_P.tolist()}
  d = evaluate.paired_difference("agreement", student, teacher, teacher, 400, 0)
  # The teacher agrees with itself on every resample: the difference's SE is the student's own.
  assert d["value"] == pytest.approx(student["value"] - 1)
  assert d["se"] == pytest.approx(evaluate.bootstrap_se(evaluate.spearman, m_P, t_P, 400, 0), rel=1e-9)
  assert evaluate.paired_difference("agreement", student, teacher, None, 400, 0) is None


def finetune_result(pred_SN, y_N, metric="accuracy"):
  tests = [evaluate.score(metric, y_N, p) for p in pred_SN]
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
  d = evaluate.paired_difference("nsp", a, b, None, 2000, 0)
  right_a, right_b = (np.array(a["seeds"][0]["test_pred"]) == y_N), (np.array(b["seeds"][0]["test_pred"]) == y_N)
  analytic = np.std(right_a * 1.0 - right_b, ddof=1) / np.sqrt(len(y_N))  # the paired SE of a mean
  assert d["value"] == pytest.approx(right_a.mean() - right_b.mean())
  assert d["se"] == pytest.approx(analytic, rel=0.1)
  # Seeds that disagree add their spread: sd²/seeds of each model on top of the items' part.
  a3 = finetune_result(np.array([flip(base_N, q) for q in (0.0, 0.05, 0.2)]), y_N)
  d3 = evaluate.paired_difference("nsp", a3, b, None, 2000, 0)
  items_only = evaluate.paired_difference("nsp", {**a3, "spread": 0.0}, b, None, 2000, 0)
  assert d3["se"] ** 2 == pytest.approx(items_only["se"] ** 2 + a3["spread"] ** 2 / 3, rel=1e-9)
  # Another metric is recomputed on each resample (F1 is not a mean over items).
  f = evaluate.paired_difference("x", finetune_result(np.array([base_N]), y_N, "f1"),
                                 finetune_result(np.array([flip(base_N, 0.1)]), y_N, "f1"), None, 200, 0)
  assert 0 < f["se"] < 0.05 and np.isfinite(f["z"])
  # Scored on other test items (another text's probe): not compared.
  other = finetune_result(np.array([base_N[:-1]]), y_N[:-1])
  assert evaluate.paired_difference("nsp", a, other, None, 50, 0) is None
  # Equal models: a difference of 0 with SE 0 reads as 0 SE, not nan.
  assert evaluate.paired_difference("nsp", a, a, None, 50, 0)["z"] == 0.0


def test_comparisons_pair_each_student_with_every_model_and_the_teacher_with_the_baselines():
  row = lambda v: {"retrieval_mrr": evaluate._mean_se(np.full(10, v) + np.arange(10) / 100)}
  results = {"teacher": row(0.5), "student: a": row(0.4), "student: b": row(0.3),
             "baseline: random init": row(0.1), "baseline: first teacher layers": row(0.2)}
  c = evaluate.comparisons(results, 10, 0)
  assert list(c) == ["student: a − teacher", "student: a − student: b", "student: a − baseline: random init",
                     "student: a − baseline: first teacher layers", "student: b − teacher",
                     "student: b − student: a", "student: b − baseline: random init",
                     "student: b − baseline: first teacher layers", "teacher − baseline: random init",
                     "teacher − baseline: first teacher layers"]
  assert c["student: a − baseline: random init"]["retrieval_mrr"]["value"] == pytest.approx(0.3)
  assert c["student: a − baseline: random init"]["retrieval_mrr"]["z"] > 1e6  # the items' noise cancels


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


def test_nsp_task_tests_on_other_documents_and_caps_at_what_the_text_has():
  docs = [f"Doc {d} sentence one is here. Doc {d} sentence two is here. Doc {d} sentence three is here."
          for d in range(30)]
  t = evaluate.nsp_task(docs, seed=0, train_size=50, test_size=2000)
  assert len(t.train[2]) == 50 and len(t.test[2]) == 60   # 15 documents x 2 successors x 2 labels
  doc_of = lambda part: {int(s.split()[1]) for s in part[0] + part[1]}
  assert doc_of(t.train) <= set(range(15)) and doc_of(t.test) <= set(range(15, 30))  # no shared text


def test_sentences_of_spaced_and_unspaced_scripts():
  # Spaced scripts: a stop and whitespace end a sentence; under 4 words is dropped; a stop inside a
  # quotation is not followed by whitespace, so it does not end the sentence that quotes it.
  assert evaluate._sentences('It printed "Hello, world!" to the screen. Short one. The next one\nruns on.') \
      == ['It printed "Hello, world!" to the screen.', "The next one runs on."]
  # Chinese and Japanese: no space after 。！？, and split() sees one word, so length is in characters.
  zh = "Rust 是一种系统编程语言。它注重安全、速度和并发性！你想学它吗？它的编译器会检查内存安全。"
  assert evaluate._sentences(zh) == ["Rust 是一种系统编程语言。", "它注重安全、速度和并发性！",
                                     "它的编译器会检查内存安全。"]   # 你想学它吗: 5 characters, too short
  ja = "「こんにちは、元気ですか。」と彼は言いました。それから二人は駅まで歩きました。"
  assert evaluate._sentences(ja) == ["「こんにちは、元気ですか。」と彼は言いました。", "それから二人は駅まで歩きました。"]
  # A text in such a script gives the probes their pairs (it gave none: every probe refused it).
  docs = [f"第{d}章的第一句话在这里写着。第{d}章的第二句话在这里写着。第{d}章的第三句话在这里写着。" for d in range(30)]
  a, b, y = evaluate.nsp_pairs(docs, seed=0)
  assert len(y) == 120 and y.mean() == 0.5
  p = evaluate.probe_text(docs, queries=50, pairs=40, seed=0)
  assert len(p.query_N) == 50 and all("第一句" in p.sentences[q] or "第二句" in p.sentences[q] for q in p.query_N)


def test_nsp_in_a_text_of_one_document_takes_far_negatives_and_halves_at_the_middle():
  # A .txt without blank lines is one document: no other document to draw negatives from (this hung).
  sents = [f"Sentence {i} of the only document here." for i in range(60)]
  a, b, y = evaluate.nsp_pairs([" ".join(sents)], seed=0)
  assert len(y) == 2 * 59 and y.mean() == 0.5
  num = lambda s: int(s.split()[1])
  for sa, sb, label in zip(a, b, y):
    assert num(sb) == num(sa) + 1 if label else abs(num(sb) - num(sa)) > 8
  t = evaluate.nsp_task([" ".join(sents)], seed=0)
  assert {num(s) for s in t.train[0] + t.train[1]} <= set(range(30))
  assert {num(s) for s in t.test[0] + t.test[1]} <= set(range(30, 60))  # the test half never trained on
  titled = evaluate.nsp_task(["Chapter one", " ".join(sents)], seed=0)  # a title is not a second document
  assert titled.train[:2] == t.train[:2] and titled.test[:2] == t.test[:2]
  # A document whose only neighbour has no sentence (a title) is alone too; too short to have a sentence
  # 9 places away, it has no pairs, and too few pairs is a ValueError, not a probe on a handful.
  assert len(evaluate.nsp_pairs(["Chapter one", " ".join(sents[:9])], seed=0)[2]) == 0
  with pytest.raises(ValueError, match="next-sentence pairs"):
    evaluate.nsp_task([" ".join(sents[:21])], seed=0)


def test_metrics_against_hand_computed_values():
  y = np.array([1, 1, 0, 0, 1, 0])
  p = np.array([1, 0, 0, 1, 1, 0])
  assert evaluate.score("accuracy", y, p) == pytest.approx(4 / 6)
  assert evaluate.score("f1", y, p) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))   # tp 2, fp 1, fn 1
  assert evaluate.score("matthews", y, p) == pytest.approx((2 * 2 - 1 * 1) / 9)  # (tp tn - fp fn)/sqrt(3^4)


def test_package_task_on_a_fake_site_packages(site, tmp_path):
  task = evaluate.package_task(site, classes=12, per_class=6, seed=0)
  assert len(task.labels) == 12 and set(task.labels) <= {f"pkg{k}" for k in range(13)}
  parts = {"train": task.train, "dev": task.dev, "test": task.test}
  for a, b, y in parts.values():
    assert b is None and np.bincount(y, minlength=12).min() == np.bincount(y).max()  # balanced
  assert [len(p[2]) for p in parts.values()] == [12 * 4, 12 * 1, 12 * 1]  # 6 per class: 60/20/20
  texts = [set(p[0]) for p in parts.values()]
  assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
  for a, _, y in parts.values():
    for doc, label in zip(a, y):
      assert held(doc) and f"of {task.labels[label]}:" in doc  # held-out docs, labelled by package
  assert all("Vendored" not in d for p in parts.values() for d in p[0])
  again = evaluate.package_task(site, classes=12, per_class=6, seed=0).test  # seeded
  assert again[0] == task.test[0] and (again[2] == task.test[2]).all()
  with pytest.raises(ValueError, match="needs 14 installed packages"):
    evaluate.package_task(site, classes=16, min_classes=14)


def test_linear_probe_learns_a_separable_toy_set():
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 3, (5, 8))
  def part(n):
    y = rng.integers(0, 5, n)
    return centres[y] + rng.normal(size=(n, 8)), y
  r = evaluate.linear_probe(part(200), part(50), part(100))
  assert r["value"] > 0.95 and r["se"] == pytest.approx(np.sqrt(r["value"] * (1 - r["value"]) / 100))
  assert r["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)


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
  task = evaluate.load_task(f"{path}:text,label")
  assert len(task.train[0]) == 160 and len(task.test[0]) == 40 and task.train[1] is None
  reads = []
  score = evaluate.score
  monkeypatch.setattr(evaluate, "score", lambda m, y, p: reads.append(y is task.test[2]) or score(m, y, p))
  config, params = hf.load_pretrained(tiny_teacher)
  r = evaluate.finetune(config, params, AutoTokenizer.from_pretrained(tiny_teacher), task,
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


def test_the_table_says_when_every_seed_chose_the_last_epoch(tmp_path):
  grid = lambda best: [{"lr": 2e-4, "epoch": e, "dev": 0.5 + 0.1 * (e == best)} for e in (1, 2, 3)]
  ft = lambda *best: {"value": 0.7, "spread": 0.01, "se": 0.006, "n": 10,
                      "seeds": [{"seed": i, "lr": 2e-4, "epoch": b, "dev": 0.6, "test": 0.7, "dev_grid": grid(b)}
                                for i, b in enumerate(best)]}
  row = lambda nsp, package: {"layers": 3, "hidden": 8, "params_M": 1.0, "retrieval_mrr": {"value": 0.2, "se": 0.01},
                              "nsp": nsp, "package": package}
  results = {"teacher": row(ft(3, 3, 3), ft(3, 2, 3)), "student": row(ft(2, 3, 3), ft(3, 3, 3))}
  assert evaluate.last_epoch_everywhere(results) == ["teacher: nsp", "student: package"]
  md = tmp_path / "results.md"
  evaluate.write_table(results, evaluate._metrics(results), 3, str(md))
  assert md.read_text().strip().endswith("a larger --epochs tells): teacher: nsp; student: package.")
  results["teacher"]["nsp"], results["student"]["package"] = ft(3, 2, 3), ft(1, 3, 3)
  evaluate.write_table(results, evaluate._metrics(results), 3, str(md))
  assert "last epoch" not in md.read_text()


def test_bad_task_file_columns(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"sentence": "x", "label": 1}) + "\n")
  with pytest.raises(ValueError, match="no column 'text'"):
    evaluate.load_task(f"{path}:text,label")


def test_task_files_from_a_spreadsheet_and_tabs(tmp_path):
  """A CSV with a byte-order mark (as spreadsheets export it) and a TSV read the same as a plain CSV."""
  rows = [(f"text {i}, with a comma", f"other {i}", "yes" if i % 3 else "no") for i in range(20)]
  plain = tmp_path / "t.csv"
  with open(plain, "w", newline="") as f:
    csv.writer(f).writerows([("a", "b", "label"), *rows])
  bom = tmp_path / "bom.csv"
  bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
  tsv = tmp_path / "t.tsv"
  tsv.write_text("a\tb\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows))
  jsonl = tmp_path / "t.jsonl"
  jsonl.write_text("".join(json.dumps(dict(zip(("a", "b", "label"), r))) + "\n" for r in rows))
  tasks = [evaluate.load_task(f"{p}:a,b,label") for p in (plain, bom, tsv, jsonl)]
  for t in tasks:
    assert t.labels == ["no", "yes"] and len(t.train[2]) == 16 and len(t.test[2]) == 4
    for part in ("train", "test"):
      for x, want in zip(getattr(t, part), getattr(tasks[0], part)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want))


@pytest.mark.parametrize("name, content, message", [
    ("short.csv", "text,label\n" + "x,a\n" * 5 + "y\n", "short.csv line 7: no value for 'label'"),
    ("gap.jsonl", '{"text": "x", "label": 1}\n\n{"text": "y"}\n', "gap.jsonl line 3: no value for 'label'"),
    ("bad.jsonl", '{"text": "x", "label": 1}\n{"text": y}\n', "bad.jsonl line 2: not JSON"),
    ("list.jsonl", '["x", 1]\n', "list.jsonl line 1: not a JSON object"),
    ("one.csv", "text,label\n" + "x,a\n" * 12, "12 rows with 1 distinct labels in 'label'; a task needs "
                                                  "at least 10 rows and 2 labels"),
    ("few.csv", "text,label\n" + "x,a\ny,b\n" * 2, "4 rows with 2 distinct labels"),
    ("t.txt", "x\n", "use a .csv, .tsv (a header line first) or .jsonl file"),
    ("latin1.csv", "text,label\ncaf\xe9,a\n".encode("latin-1"), "latin1.csv: not UTF-8 text (invalid continuation byte"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ValueError, match=re.escape(message)):
    evaluate.load_task(f"{tmp_path / name}:text,label")


# --- Whole runs ----------------------------------------------------------------------------------------

def snapshot(folder):
  """Every path under folder (but eval/) with its size and mtime."""
  out = {}
  for d, dirs, files in os.walk(folder):
    dirs[:] = [x for x in dirs if os.path.join(d, x) != os.path.join(folder, "eval")]
    for x in dirs + files:
      st = os.stat(os.path.join(d, x))
      out[os.path.relpath(os.path.join(d, x), folder)] = (st.st_size if x in files else 0, st.st_mtime_ns)
  return out


def test_evaluate_run_table_read_only_and_curve(tiny_teacher, tiny_corpus, tmp_path, site):
  w = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "run"))
  tmp = os.path.join(w, "checkpoints", "7.orbax-checkpoint-tmp-123")  # another process's save in flight
  os.makedirs(tmp)
  before = snapshot(w)
  results = evaluate.evaluate_run(w, protocol=TINY, baselines=False, package_roots=site, log=lambda m: None)
  assert os.path.isdir(tmp) and snapshot(w) == before  # nothing but eval/ written or removed
  assert set(results) == {"teacher", "student: run"}
  for name, row in results.items():
    for m in ("retrieval_mrr", "agreement", "package_linear", "nsp", "package"):
      assert 0 <= row[m]["value"] <= 1 and ("spread" in row[m] or row[m]["se"] >= 0), (name, m)
    for m in ("nsp", "package"):
      assert len(row[m]["seeds"]) == 2 and {"lr", "epoch", "dev", "test"} <= set(row[m]["seeds"][0])
  assert results["teacher"]["agreement"]["value"] == 1.0 and results["teacher"]["agreement"]["se"] == 0.0
  loss = results["student: run"]["heldout_relation_loss"]
  assert np.isfinite(loss["value"]) and loss["value"] > 0 and loss["se"] > 0
  for name in ("results.json", "results.md", "results.png"):
    assert os.path.isfile(os.path.join(w, "eval", name))
  text = open(os.path.join(w, "eval", "results.md")).read()
  table, differences = text.split("\n\nDifferences, paired")
  table = table.splitlines()
  assert "(± sd, 2 seeds)" in table[0] and "(± SE)" in table[0]
  for line in table[2:]:  # every number has its ± next to it
    cells = [c.strip() for c in line.strip("|").split("|")[2:]]
    assert all(c == "" or " ± " in c for c in cells), line
  saved = json.load(open(os.path.join(w, "eval", "results.json")))
  assert saved["settings"]["protocol"]["seeds"] == 2 and len(saved["package_labels"]) == 12
  # The student against the teacher, paired over the same items, for every metric both have.
  d = saved["differences"]["student: run − teacher"]
  assert set(d) == {"retrieval_mrr", "agreement", "package_linear", "nsp", "package"}
  for m, v in d.items():
    assert v["value"] == pytest.approx(results["student: run"][m]["value"] - results["teacher"][m]["value"])
    assert v["se"] >= 0 and (v["se"] == 0 or v["z"] == pytest.approx(v["value"] / v["se"])), m
  row = next(line for line in differences.splitlines() if line.startswith("| student: run − teacher |"))
  assert all(re.fullmatch(r"[+-]\d\.\d+ ± \d\.\d+ \([+-]\d+\.\d SE\)", c.strip())
             for c in row.strip("|").split("|")[1:]), row

  with pytest.raises(ValueError, match="same settings"):
    evaluate.evaluate_curve(w, protocol=evaluate.Protocol(), package_roots=site, log=lambda m: None)
  curve = evaluate.evaluate_curve(w, protocol=TINY, package_roots=site, log=lambda m: None)
  assert sorted(curve) == [2, 4] and curve[2]["tokens"] == 2 * 8 * 32  # the kept checkpoints
  assert os.path.isdir(tmp)
  # The last checkpoint holds the exported student's params: the same scores as in the table.
  final = results["student: run"]
  for m in ("heldout_relation_loss", "retrieval_mrr", "agreement", "package_linear"):
    assert curve[4][m]["value"] == pytest.approx(final[m]["value"], rel=1e-5), m
  assert curve[2]["heldout_relation_loss"]["value"] != pytest.approx(loss["value"], rel=1e-6)
  assert "nsp" not in curve[4]  # the curve fine-tunes only when asked
  for name in ("curve.json", "curve.png"):
    assert os.path.isfile(os.path.join(w, "eval", name))


def test_evaluate_run_on_a_text_of_one_document(tiny_teacher, tiny_corpus, tmp_path, site):
  # One document (lines, no blank line: the nsp probe hung on it), as JSON Lines under another field.
  w = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "run"))
  words = "alpha beta gamma delta omega kappa sigma theta".split()
  rng = np.random.default_rng(0)

  def one_doc(path, n):
    path.write_text(json.dumps({"content": "\n".join(
        f"Line {i} says {' '.join(rng.choice(words, 5))}." for i in range(n))}) + "\n")
    return str(path)

  text = one_doc(tmp_path / "one.jsonl", 120)
  results = evaluate.evaluate_run(w, str(tmp_path / "out"), text=text, text_field="content",
                                  protocol=dataclasses.replace(TINY, seeds=1), baselines=False,
                                  package_roots=site, log=lambda m: None)
  for row in results.values():
    assert row["nsp"]["n"] == 32 and row["nsp"]["n_train"] == 40 and 0 <= row["nsp"]["value"] <= 1
  saved = json.load(open(tmp_path / "out" / "results.json"))
  assert saved["settings"]["text_field"] == "content"
  # Too little text for the probe (halves of 10 and 11 sentences, few of them 9 apart) is one line, before
  # any model is evaluated or site-packages parsed; the CLI's --text-field is what reads the text.
  short = one_doc(tmp_path / "short.jsonl", 21)
  r = eval_cli("--workdir", w, "--text", short, "--out", str(tmp_path / "out2"))
  assert r.returncode == 2 and "no text field 'text'" in r.stderr
  r = eval_cli("--workdir", w, "--text", short, "--text-field", "content", "--out", str(tmp_path / "out2"))
  assert r.returncode == 2 and r.stderr.strip() == (
      "minilm-eval: error: the held-out text gives 2 next-sentence pairs from its first half and 6 from "
      "its second; the nsp probe needs at least 20 in each (more text, or --no-finetune to skip it)")
  assert not os.path.exists(tmp_path / "out2")


def test_every_kth_layer_is_a_baseline_only_where_it_is_not_the_first_n_layers():
  three = ["random", "teacher_first", "teacher"]
  assert evaluate.baseline_inits(6, 3) == three           # layers 0, 2, 4 against 0, 1, 2
  assert evaluate.baseline_inits(24, 6) == three
  assert evaluate.baseline_inits(6, 4) == three[:2]       # k = 1: every layer from the first is the first 4
  assert evaluate.baseline_inits(12, 8) == three[:2]
  assert evaluate.baseline_inits(2, 1) == three[:2]       # k = 2, but one layer: layer 0 either way


def test_several_runs_in_one_table_with_one_set_of_baselines(tiny_teacher, tiny_corpus, tmp_path, site):
  a = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "a"))
  b = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "b"), seed=1, **{"optim.lr": 1e-3})
  with pytest.raises(ValueError, match="--out"):
    evaluate.evaluate_run([a, b], protocol=TINY, finetune_too=False, package_roots=site)
  out = str(tmp_path / "both")
  results = evaluate.evaluate_run([a, b], out, protocol=TINY, finetune_too=False, package_roots=site,
                                  log=lambda m: None)
  # 1 of the teacher's 2 layers: every 2nd layer is the first, one baseline (baseline_inits).
  assert list(results) == ["teacher", "student: a", "student: b", "baseline: random init",
                           "baseline: first teacher layers"]
  assert results["student: a"]["heldout_relation_loss"] != results["student: b"]["heldout_relation_loss"]
  assert all("nsp" not in row for row in results.values())
  table, differences = open(os.path.join(out, "results.md")).read().split("\n\nDifferences, paired")
  assert table.count("baseline: random init") == 1 and "student: a" in table and "student: b" in table
  assert "| student: a − student: b |" in differences and "| student: b − student: a |" in differences
  assert not os.path.exists(os.path.join(a, "eval"))
  c = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "c"), **{"student.hidden_size": 32})
  with pytest.raises(ValueError, match="another student shape.*hidden_size"):
    evaluate.evaluate_run([a, c], out, protocol=TINY, finetune_too=False, package_roots=site)


def test_checkpoint_student_reads_any_kept_step_with_the_run_s_own_shape(tiny_teacher, tiny_corpus, tmp_path):
  w = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "deep"),
                **{"student.num_layers": 2, "loss.terms": "relations,hidden"})  # 16 wide: a projection
  encoder, exported = hf.load_student(w)
  config, last = evaluate.checkpoint_student(w, 4)
  assert config == encoder.config and config.num_hidden_layers == 2   # not the tiny default's 1 layer
  _, _, mngr, _ = evaluate.read_run(w)
  assert objective.PROJECTION in checkpoint.restore_params(mngr, 4) and objective.PROJECTION not in last
  flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
  assert flat(last).keys() == flat(exported).keys()
  for k, v in flat(last).items():
    np.testing.assert_array_equal(v, flat(exported)[k])
  _, early = evaluate.checkpoint_student(w, 2)                         # kept by keep_every
  assert any(not np.array_equal(e, flat(last)[k]) for k, e in flat(early).items())
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
    evaluate.checkpoint_student(w, 3)


def test_a_remote_run_is_read_in_place_and_its_results_go_to_the_local_mirror(tiny_teacher, tiny_corpus,
                                                                              tmp_path, site, monkeypatch):
  """A gs:// workdir (a local folder stands in for the bucket, as in test_train): minilm-eval reads its
  checkpoints and student where they are and writes nothing to it."""
  from minilm_jax import workdir as wd
  monkeypatch.setattr(wd, "is_remote", lambda path: True)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  bucket = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "bucket"))
  before = snapshot(bucket)
  results = evaluate.evaluate_run(bucket, protocol=TINY, finetune_too=False, baselines=False,
                                  package_roots=site, log=lambda m: None)
  assert set(results) == {"teacher", "student: bucket"} and snapshot(bucket) == before
  assert not os.path.exists(os.path.join(bucket, "eval"))
  assert wd.eval_dir(bucket).startswith(str(tmp_path / "home"))
  assert os.path.isfile(os.path.join(wd.eval_dir(bucket), "results.md"))


def test_a_run_whose_teacher_is_elsewhere_here(tiny_teacher, tiny_corpus, tmp_path, site, monkeypatch):
  """A run distilled on another machine records its teacher's path there. minilm-eval then takes the
  run's config.teacher as resolved here (a hub id's packaged copy at another site-packages, say), or
  --teacher; either is checked against the recorded sha256, and nothing is written on an error."""
  import shutil
  there, here = tmp_path / "there" / "teacher", tmp_path / "here" / "teacher"
  shutil.copytree(tiny_teacher, there)
  monkeypatch.setitem(hf.PACKAGED, "org/tiny", "no_such_module")
  monkeypatch.setattr(hf, "packaged_teacher_path", lambda: str(there))
  w = train_run("org/tiny", tiny_corpus, str(tmp_path / "run"))
  shutil.move(there, here)  # the teacher's packaged copy lives elsewhere on this machine

  def not_installed():
    raise FileNotFoundError("the packaged teacher is not installed")
  monkeypatch.setattr(hf, "packaged_teacher_path", not_installed)
  run = lambda **kw: evaluate.evaluate_run(w, str(tmp_path / "out"), protocol=TINY, finetune_too=False,
                                           baselines=False, package_roots=site, log=lambda m: None, **kw)
  with pytest.raises(FileNotFoundError, match=f"teacher at {there}, which is not on this machine, and its "
                     "config's teacher 'org/tiny' is not found here either .*give its folder with --teacher"):
    run()
  assert not os.path.exists(tmp_path / "out")
  monkeypatch.setattr(hf, "packaged_teacher_path", lambda: str(here))
  results = run()
  assert set(results) == {"teacher", "student: run"}
  assert json.load(open(tmp_path / "out" / "results.json"))["teacher"] == str(here)

  # --teacher names it directly; a folder with other weights or another tokenizer is refused.
  other, tok = tmp_path / "other", tmp_path / "tok"
  shutil.copytree(here, other)
  config = json.load(open(other / "config.json"))
  json.dump({**config, "layer_norm_eps": 1e-6}, open(other / "config.json", "w"))
  shutil.copytree(here, tok)
  with open(tok / "tokenizer_config.json", "a") as f:
    f.write("\n")
  shutil.rmtree(tmp_path / "out")
  for folder, what in ((other, "config or weights"), (tok, "tokenizer")):
    with pytest.raises(ValueError, match=f"{folder} is not the teacher {w} was distilled from: its {what} "
                       "differ"):
      run(teacher=str(folder))
    assert not os.path.exists(tmp_path / "out")
  r = eval_cli("--workdir", w, "--teacher", str(tmp_path / "nowhere"), "--no-finetune", "--out",
               str(tmp_path / "out"))
  assert r.returncode == 2 and r.stderr.strip() == f"minilm-eval: error: {tmp_path / 'nowhere'}: no such folder"
  again = run(teacher=str(here))["student: run"]
  for m in ("retrieval_mrr", "agreement", "package_linear", "heldout_relation_loss"):
    assert again[m] == results["student: run"][m], m


def test_a_chain_is_evaluated_with_its_assistant_also_after_the_run_moved(tiny_teacher, tiny_corpus,
                                                                          tmp_path, site):
  """A teaching-assistant chain's table has the assistant's row; the assistant is read from the run's own
  assistant/ folder (checked against the sha256 the student stage recorded), so a moved run still reads."""
  import shutil
  w = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "chain"),
                **{"assistant.enabled": True, "assistant.steps": 2})
  moved = str(tmp_path / "moved")
  shutil.move(w, moved)
  results = evaluate.evaluate_run(moved, str(tmp_path / "out"), protocol=TINY, finetune_too=False,
                                  baselines=False, package_roots=site, log=lambda m: None)
  assert list(results) == ["teacher", "assistant", "student: moved"]
  assert (results["assistant"]["layers"], results["assistant"]["hidden"]) == (2, 16)
  assert results["teacher"]["hidden"] == 32 and results["teacher"]["agreement"]["value"] == 1.0


def eval_cli(*args):
  return subprocess.run([sys.executable, "-c", "from minilm_jax.cli import eval_main; eval_main()", *args],
                        capture_output=True, text=True, timeout=120)


def test_minilm_eval_one_line_errors(tmp_path):
  r = eval_cli("--workdir", str(tmp_path))
  assert r.returncode == 2
  assert r.stderr.strip() == f"minilm-eval: error: {tmp_path}: no checkpoint; is this a minilm-distill workdir?"
  assert os.listdir(tmp_path) == []  # nothing created
  r = eval_cli("--workdir", str(tmp_path), "--out", str(tmp_path / "checkpoints"))
  assert r.returncode == 2 and r.stderr.strip().startswith(
      f"minilm-eval: error: --out {tmp_path / 'checkpoints'} is inside the run {tmp_path}, which "
      "minilm-eval only reads")
  assert os.listdir(tmp_path) == []
  evaluate.check_out(str(tmp_path / "eval" / "v2"), [str(tmp_path)])  # its own eval/ is fine
  evaluate.check_out(str(tmp_path.parent / "elsewhere"), [str(tmp_path)])
  r = eval_cli("--workdir", str(tmp_path), "--lr", "-1")
  assert r.returncode == 2 and r.stderr.strip() == (
      "minilm-eval: error: --lr -1.0: learning rates must be positive and finite")
  r = eval_cli("--workdir", str(tmp_path), "--workdir", str(tmp_path / "b"))
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "minilm-eval: error: several runs: give --out DIR for the shared table"]


def test_a_modernbert_run_is_evaluated_with_its_baselines(tiny_modernbert, tiny_corpus, tmp_path, site):
  w = train_run(tiny_modernbert, tiny_corpus, str(tmp_path / "mb"), **{"student.num_layers": 2})
  results = evaluate.evaluate_run(w, protocol=TINY, finetune_too=False, package_roots=site,
                                  log=lambda m: None)
  assert set(results) == {"teacher", "student: mb", "baseline: random init",
                          "baseline: first teacher layers", "baseline: every k-th teacher layer"}
  for name, row in results.items():
    assert 0 <= row["retrieval_mrr"]["value"] <= 1, name
  # The baselines are the student's architecture without distillation, so their relation loss differs.
  losses_ = {n: r["heldout_relation_loss"]["value"] for n, r in results.items() if n != "teacher"}
  assert len(set(losses_.values())) == 4 and all(np.isfinite(v) for v in losses_.values())


def test_made_with_reads_the_text_protocol_and_tasks():
  want = evaluate.settings_of(TINY, "book.txt", ["nsp"], ())
  assert evaluate.made_with(evaluate.settings_of(TINY, "book.txt", ["nsp", "package"], ()), want)
  old = {k: v for k, v in evaluate.settings_of(TINY, "book.txt", ["nsp"], ()).items() if k != "text_field"}
  assert evaluate.made_with(old, want)  # a table from before text_field read "text"
  assert not evaluate.made_with(evaluate.settings_of(TINY, None, ["nsp"], ()), want)
  assert not evaluate.made_with(evaluate.settings_of(TINY, "book.txt", ["package"], ()), want)
  assert not evaluate.made_with(evaluate.settings_of(evaluate.Protocol(), "book.txt", ["nsp"], ()), want)
