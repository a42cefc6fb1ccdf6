"""evaluation.tasks: next-sentence pairs, the package task on a fake site-packages, and task files."""

import csv
import json
import re

import numpy as np
import pytest

from minilm_jax.evaluation import probes
from minilm_jax.evaluation.tasks import load_sts, load_task, nsp_pairs, nsp_task, package_task
from evaluation_helpers import held, site  # noqa: F401 (site: a fixture)


def test_nsp_pairs_are_balanced_and_honest():
  docs = [f"Doc {d} sentence one is here. Doc {d} sentence two is here. Doc {d} sentence three is here."
          for d in range(30)]
  a, b, y = nsp_pairs(docs, seed=0)
  assert len(a) == len(b) == len(y) == 120
  assert y.mean() == 0.5
  for sa, sb, label in zip(a, b, y):
    same_doc = sa.split()[1] == sb.split()[1]
    nxt = {"one": "two", "two": "three"}[sa.split()[3]]
    assert (label == 1) == (same_doc and sb.split()[3] == nxt)


def test_nsp_task_tests_on_other_documents_and_caps_at_what_the_text_has():
  docs = [f"Doc {d} sentence one is here. Doc {d} sentence two is here. Doc {d} sentence three is here."
          for d in range(30)]
  t = nsp_task(docs, seed=0, train_size=50, test_size=2000)
  assert len(t.train[2]) == 50 and len(t.test[2]) == 60   # 15 documents x 2 successors x 2 labels
  doc_of = lambda part: {int(s.split()[1]) for s in part[0] + part[1]}
  assert doc_of(t.train) <= set(range(15)) and doc_of(t.test) <= set(range(15, 30))  # no shared text


def test_a_text_in_an_unspaced_script_gives_the_probes_their_pairs():
  # A text in such a script gives the probes their pairs (it gave none: every probe refused it).
  docs = [f"第{d}章的第一句话在这里写着。第{d}章的第二句话在这里写着。第{d}章的第三句话在这里写着。" for d in range(30)]
  a, b, y = nsp_pairs(docs, seed=0)
  assert len(y) == 120 and y.mean() == 0.5
  p = probes.probe_text(docs, queries=50, pairs=40, seed=0)
  assert len(p.query_N) == 50 and all("第一句" in p.sentences[q] or "第二句" in p.sentences[q] for q in p.query_N)


def test_nsp_in_a_text_of_one_document_takes_far_negatives_and_halves_at_the_middle():
  # A .txt without blank lines is one document: no other document to draw negatives from (this hung).
  sents = [f"Sentence {i} of the only document here." for i in range(60)]
  a, b, y = nsp_pairs([" ".join(sents)], seed=0)
  assert len(y) == 2 * 59 and y.mean() == 0.5
  num = lambda s: int(s.split()[1])
  for sa, sb, label in zip(a, b, y):
    assert num(sb) == num(sa) + 1 if label else abs(num(sb) - num(sa)) > 8
  t = nsp_task([" ".join(sents)], seed=0)
  assert {num(s) for s in t.train[0] + t.train[1]} <= set(range(30))
  assert {num(s) for s in t.test[0] + t.test[1]} <= set(range(30, 60))  # the test half never trained on
  titled = nsp_task(["Chapter one", " ".join(sents)], seed=0)  # a title is not a second document
  assert titled.train[:2] == t.train[:2] and titled.test[:2] == t.test[:2]
  # A document whose only neighbour has no sentence (a title) is alone too; too short to have a sentence
  # 9 places away, it has no pairs, and too few pairs is a ValueError, not a probe on a handful.
  assert len(nsp_pairs(["Chapter one", " ".join(sents[:9])], seed=0)[2]) == 0
  with pytest.raises(ValueError, match="next-sentence pairs"):
    nsp_task([" ".join(sents[:21])], seed=0)


def test_package_task_on_a_fake_site_packages(site, tmp_path):
  task = package_task(site, classes=12, per_class=6, seed=0)
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
  again = package_task(site, classes=12, per_class=6, seed=0).test  # seeded
  assert again[0] == task.test[0] and (again[2] == task.test[2]).all()
  with pytest.raises(ValueError, match="needs 14 installed packages"):
    package_task(site, classes=16, min_classes=14)


def test_bad_task_file_columns(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"sentence": "x", "label": 1}) + "\n")
  with pytest.raises(ValueError, match="no column 'text'"):
    load_task(f"{path}:text,label")


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
  tasks = [load_task(f"{p}:a,b,label") for p in (plain, bom, tsv, jsonl)]
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
    ("t.xlsx", "x\n", "use a .csv, .tsv or .txt (tab-separated) or .jsonl file"),
    ("latin1.csv", "text,label\ncaf\xe9,a\n".encode("latin-1"), "latin1.csv: not UTF-8 text (invalid continuation byte"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ValueError, match=re.escape(message)):
    load_task(f"{tmp_path / name}:text,label")


def write_pairs(tmp_path, rows, header=("a", "b", "score")):
  """The same pairs as .csv (with a byte-order mark), .tsv and .jsonl."""
  c = tmp_path / "p.csv"
  with open(c, "w", newline="", encoding="utf-8-sig") as f:
    csv.writer(f).writerows([header, *rows])
  t = tmp_path / "p.tsv"
  t.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
  j = tmp_path / "p.jsonl"
  j.write_text("".join(json.dumps(dict(zip(header, r)), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return c, t, j


def test_sts_pair_files_in_any_format_and_script_read_alike(tmp_path):
  rows = [(f"Ein Satz Nummer {i}, mit Komma", f"第{i}句话，好的。", i % 6 * 0.5) for i in range(12)]
  for path in write_pairs(tmp_path, rows):
    x = load_sts(f"{path}:a,b,score")
    assert x.name == path.name and x.a == [r[0] for r in rows] and x.b == [r[1] for r in rows]
    np.testing.assert_array_equal(x.score_N, [r[2] for r in rows])


@pytest.mark.parametrize("name, content, message", [
    ("s.csv", "a,b,score\n" + "x,y,1\n" * 11 + "x,y,high\n", "s.csv line 13: the score 'high' in 'score' is not "
                                                            "a finite number"),
    ("s.jsonl", '{"a": "x", "b": "y", "score": 1}\n' * 3 + '{"a": "x", "b": "y", "score": "nan"}\n',
     "s.jsonl line 4: the score 'nan'"),
    ("s.tsv", "a\tb\tscore\n" + "x\ty\n", "s.tsv line 2: no value for 'score'"),
    ("s.csv", "a,b,sim\nx,y,1\n", "s.csv: no column 'score' (columns: ['a', 'b', 'sim'])"),
    ("s.csv", "", "STS file {dir}/s.csv: no pairs (an empty file, or a header line only)"),
    ("s.csv", "a,b,score\n", "no pairs"),
    ("s.csv", "a,b,score\n" + "x,y,2\n" * 12, "12 pairs with 1 distinct scores; a correlation needs at least 10 "
                                              "pairs and 2 scores"),
    ("s.xlsx", "x\n", "STS file {dir}/s.xlsx: use a .csv, .tsv"),
    ("s.csv", "a,b,score\ncaf\xe9,x,1\n".encode("latin-1"), "s.csv: not UTF-8 text"),
])
def test_bad_sts_files_are_one_line_errors_naming_file_and_line(tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ValueError, match="^[^\n]*" + re.escape(message.format(dir=tmp_path)) + "[^\n]*$"):
    load_sts(f"{tmp_path / name}:a,b,score")


def test_sts_files_as_their_makers_ship_them(tmp_path):
  """The layouts STS data comes in, read as their makers mean them: STS-B's own sts-*.csv (tab-separated
  despite the name, no header line, columns by number, a `"` that opens no quote), SICK's SICK.txt (a
  tab-separated .txt with a header) and JSON arrays. A quote processor would have joined lines at the
  unbalanced `"`: each file must give every pair, with its quotes as written."""
  a = [f'"Sentence {i} opens a quote, and never closes it.' if i == 3 else f"A man plays guitar {i}."
       for i in range(12)]
  b = [f"Someone plays an instrument {i}." for i in range(12)]
  score = [i % 6 * 1.0 for i in range(12)]
  stsb = tmp_path / "sts-dev.csv"
  stsb.write_text("".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{score[i]:.3f}\t{a[i]}\t{b[i]}"
                          + ("\tsource-extra\n" if i % 2 else "\n") for i in range(12)), encoding="utf-8")
  sick = tmp_path / "SICK.txt"
  sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                  + "".join(f"{i}\t{a[i]}\t{b[i]}\t{score[i]}\tNEUTRAL\n" for i in range(12)), encoding="utf-8")
  arrays = tmp_path / "pairs.jsonl"
  arrays.write_text("".join(json.dumps([a[i], b[i], score[i]]) + "\n" for i in range(12)), encoding="utf-8")
  for spec in (f"{stsb}:5,6,4", f"{sick}:sentence_A,sentence_B,relatedness_score", f"{arrays}:0,1,2"):
    x = load_sts(spec)
    assert x.a == a and x.b == b, spec
    np.testing.assert_array_equal(x.score_N, score)


def test_numbered_columns_need_a_file_without_a_header(tmp_path):
  path = tmp_path / "p.tsv"
  path.write_text("a\tb\tscore\n" + "x\ty\t1\n" * 12)
  with pytest.raises(ValueError, match=re.escape("line 1: the score 'score' in column 2 is not a finite number "
                                                 "(a header line? name the columns instead of numbering them)")):
    load_sts(f"{path}:0,1,2")
  objects = tmp_path / "p.jsonl"
  objects.write_text('{"a": "x", "b": "y", "score": 1}\n')
  with pytest.raises(ValueError, match=re.escape("line 1: not a JSON array (columns given by number)")):
    load_sts(f"{objects}:0,1,2")
  with pytest.raises(ValueError, match=re.escape("name every column (a header line) or number every one")):
    load_sts(f"{path}:a,1,score")
  short = tmp_path / "short.tsv"
  short.write_text("x\ty\t1\n" * 11 + "x\ty\n")
  with pytest.raises(ValueError, match=re.escape("short.tsv line 12: no value for column 2")):
    load_sts(f"{short}:0,1,2")


def test_a_task_file_by_column_number(tmp_path):
  path = tmp_path / "t.tsv"
  path.write_text("".join(f'"quoted {i}\t{"pos" if i % 2 else "neg"}\n' for i in range(20)))
  t = load_task(f"{path}:0,1")
  assert t.labels == ["neg", "pos"] and len(t.train[2]) + len(t.test[2]) == 20
  assert all(x.startswith('"quoted ') for x in t.train[0])


def test_bad_sts_specs(tmp_path):
  for spec, message in (("p.csv:a,b", "use FILE:text_a,text_b,score"), ("p.csv:a,,s", "use FILE:"),
                        ("glue:sst2", "the STS sets on the hub are glue:stsb, sickr")):
    with pytest.raises(ValueError, match=re.escape(message)):
      load_sts(spec)


def test_sts_sets_on_the_hub_through_datasets(monkeypatch):
  """glue:stsb and sickr as `datasets` serves them (a stand-in for the hub: its Dataset, the real
  column names and splits), and an unreachable hub as one line."""
  datasets = pytest.importorskip("datasets")
  asked = []

  def load_dataset(path, name=None, split=None):
    asked.append((path, name, split))
    score = "label" if path == "glue" else "score"
    return datasets.Dataset.from_dict({"sentence1": ["A man plays.", "Kids run."], "sentence2": ["A man sings.", "Dogs run."],
                                       score: [3.2, 1.0], "idx": [0, 1]})
  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  for spec, want in (("glue:stsb", ("glue", "stsb", "validation")), ("sickr", ("mteb/sickr-sts", None, "test"))):
    x = load_sts(spec)
    assert asked[-1] == want and x.name == spec and x.b == ["A man sings.", "Dogs run."]
    np.testing.assert_array_equal(x.score_N, [3.2, 1.0])

  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)\nmore")
  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(ValueError, match=r"^--sts glue:stsb: `datasets` could not load glue \(ConnectionError: "
                     r"Couldn't reach 'glue' on the Hub \(LocalEntryNotFoundError\)\); give the pairs as a local "
                     r"FILE:text_a,text_b,score instead$"):
    load_sts("glue:stsb")
