"""The labelled data models are scored on: the tasks they are fine-tuned on (and the package task's linear
probe reads): next-sentence prediction from the held-out text, which installed package a held-out
docstring comes from, a user's task file, and GLUE through `datasets`; and the text pairs with human
similarity scores of the STS probes (a user's pair file, or STS-B and SICK-R through `datasets`)."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from minilm_jax import corpus
from minilm_jax.evaluation.protocol import DEFAULT_PROTOCOL, Pairs, Protocol, Task, take

# GLUE tasks: (hub config, text columns, metric). Loaded through `datasets` when the hub is reachable.
GLUE = {"sst2": (("sentence",), "accuracy"), "mnli": (("premise", "hypothesis"), "accuracy"),
        "qnli": (("question", "sentence"), "accuracy"), "qqp": (("question1", "question2"), "f1"),
        "rte": (("sentence1", "sentence2"), "accuracy"), "mrpc": (("sentence1", "sentence2"), "f1"),
        "cola": (("sentence",), "matthews")}

# STS sets on the hub: (dataset, config, split, (text_a, text_b, score) columns), loaded through `datasets`.
# GLUE's STS-B test split has no scores, so its validation split (1,500 pairs) is the one scored; SICK-R
# is MTEB's copy of it (its test split, 9,927 pairs, relatedness 1-5).
STS_HUB = {"glue:stsb": ("glue", "stsb", "validation", ("sentence1", "sentence2", "label")),
           "sickr": ("mteb/sickr-sts", None, "test", ("sentence1", "sentence2", "score"))}


# --- Next-sentence prediction -----------------------------------------------------------------------------

def nsp_pairs(docs: Sequence[str], seed: int) -> Tuple[List[str], List[str], np.ndarray]:
  """Next-sentence prediction from raw text: for each sentence with a successor, (s_i, s_i+1) is 1 and
  (s_i, a random sentence of another document) is 0, so the classes are exactly balanced."""
  return _nsp_pairs([corpus.sentences(d) for d in docs], seed)


def _nsp_pairs(sents: List[List[str]], seed: int, far: int = 8) -> Tuple[List[str], List[str], np.ndarray]:
  """nsp_pairs over documents given as sentence lists. A document alone in its text (one without blank
  lines, say) takes its negatives from its own sentences at least `far` places away, which are no more
  its successors than another document's; its sentences with no such sentence are left out."""
  rng = np.random.default_rng(seed)
  owners = [(i, s) for i, ss in enumerate(sents) for s in ss]
  a, b, y = [], [], []
  for i, ss in enumerate(sents):
    alone = len(owners) == len(ss)   # no other document has a sentence: rejection would never end
    for j in range(len(ss) - 1):
      if alone:
        before, after = max(0, j - far), max(0, len(ss) - (j + far + 1))
        if before + after == 0:
          continue
        r = int(rng.integers(before + after))
        other = ss[r if r < before else j + far + 1 + r - before]
      else:
        while True:
          k, other = owners[rng.integers(len(owners))]
          if k != i:
            break
      a += [ss[j], ss[j]]
      b += [ss[j + 1], other]
      y += [1, 0]
  order = rng.permutation(len(y))
  return [a[i] for i in order], [b[i] for i in order], np.array(y, np.int32)[order]


def nsp_task(docs: Sequence[str], seed: int = 0, train_size: int = 1000, test_size: int = 1000,
             min_pairs: int = 20) -> Task:
  """Pairs from the first half of the held-out documents for training (and dev), from the other half for
  testing, so the probe is scored on text it was not tuned on; a text of one document (one with
  sentences: a title beside it does not count) is halved at its middle sentence. Fewer than `min_pairs`
  pairs in either half is a ValueError."""
  sents = [corpus.sentences(d) for d in docs]
  texts = [ss for ss in sents if ss]
  if len(texts) == 1:  # the same condition as _nsp_pairs's `alone`, so both treat a text alike
    mid = len(texts[0]) // 2
    halves = [texts[0][:mid]], [texts[0][mid:]]
  else:
    halves = sents[:len(sents) // 2], sents[len(sents) // 2:]
  tr, te = _nsp_pairs(halves[0], seed), _nsp_pairs(halves[1], seed + 1)
  if min(len(tr[2]), len(te[2])) < min_pairs:
    raise ValueError(f"the held-out text gives {len(tr[2])} next-sentence pairs from its first half and "
                     f"{len(te[2])} from its second; the nsp probe needs at least {min_pairs} in each "
                     "(more text, or --no-finetune to skip it)")
  cut = lambda t, n: (t[0][:n], t[1][:n], t[2][:n])
  return Task("nsp", cut(tr, train_size), cut(te, test_size))


# --- Package of origin ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _package_docs(roots: Tuple[str, ...]) -> Dict[str, List[str]]:
  return corpus.package_docstrings(roots)  # parsing all of site-packages takes minutes: once per process


def package_task(roots: Sequence[str] = (), classes: int = 16, per_class: int = 100, seed: int = 0,
                 min_classes: int = 12) -> Task:
  """Which top-level package a held-out docstring comes from (see corpus.package_docstrings): the
  `classes` packages with the most such docstrings, each cut to the same number (≤ per_class, seeded),
  split 60/20/20 per class into train/dev/test."""
  docs = _package_docs(tuple(roots))
  enough = sorted((p for p, d in docs.items() if len(d) >= 5), key=lambda p: (-len(docs[p]), p))
  if len(enough) < min_classes:
    raise ValueError(f"the package task needs {min_classes} installed packages with 5 or more held-out "
                     f"docstrings; found {len(enough)} ({', '.join(enough) or 'none'})")
  names = sorted(enough[:classes])
  n = min(per_class, min(len(docs[p]) for p in names))
  rng = np.random.default_rng(seed)
  parts = {"train": ([], []), "dev": ([], []), "test": ([], [])}
  for label, p in enumerate(names):
    pick = [docs[p][i] for i in rng.permutation(len(docs[p]))[:n]]
    a, b = int(round(0.6 * n)), int(round(0.8 * n))
    for part, chunk in (("train", pick[:a]), ("dev", pick[a:b]), ("test", pick[b:])):
      parts[part][0].extend(chunk)
      parts[part][1].extend([label] * len(chunk))
  as_part = lambda k: (parts[k][0], None, np.array(parts[k][1], np.int32))
  return Task("package", as_part("train"), as_part("test"), dev=as_part("dev"), labels=names)


# --- Task files and GLUE ----------------------------------------------------------------------------------

def _columns(rows: List[dict], cols: Sequence[str], where: str, lines: Sequence[int]):
  """The named (or numbered) columns of every row as strings; a row without one (or with it empty: a
  short CSV line) is a one-line error naming its line."""
  for c in cols:
    if rows and c not in rows[0] and not c.isdigit():
      raise ValueError(f"{where}: no column {c!r} (columns: {sorted(rows[0], key=str)})")
  for i, r in enumerate(rows):
    missing = [c for c in cols if r.get(c) is None]
    if missing:
      raise ValueError(f"{where} line {lines[i]}: no value for {_column(missing[0])}")
  return [[str(r[c]) for r in rows] for c in cols]


def _column(name: str) -> str:
  return f"column {name}" if name.isdigit() else repr(name)


def _task_rows(path: str, what: str = "task file", numbered: bool = False) -> Tuple[List[dict], List[int]]:
  """The rows of a .csv/.tsv/.txt or .jsonl file, and the line each is on: with a header line (or JSON
  objects) each row maps column names to values; `numbered` (columns given as 0, 1, ...), a file with
  no header line (or JSON arrays), each row maps "0", "1", ... to its fields. A UTF-8 byte-order mark (a
  spreadsheet's export) is dropped; a file that is not UTF-8 is a one-line error."""
  try:
    return _rows(path, what, numbered)
  except UnicodeDecodeError as e:
    raise ValueError(f"{what} {path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None


def _delimiter(kind: str, first_line: str) -> str:
  """A .tsv or .txt is tab-separated (SICK's SICK.txt); a .csv is comma-separated unless its first line
  has more tabs than commas (STS-B's own sts-*.csv files are tab-separated)."""
  if kind in (".tsv", ".txt"):
    return "\t"
  return "\t" if first_line.count("\t") > first_line.count(",") else ","


def _rows(path: str, what: str, numbered: bool) -> Tuple[List[dict], List[int]]:
  kind = os.path.splitext(path)[1].lower()
  if kind not in (".csv", ".tsv", ".txt", ".jsonl"):
    raise ValueError(f"{what} {path}: use a .csv, .tsv or .txt (tab-separated) or .jsonl file")
  rows, lines = [], []
  with open(path, newline="" if kind != ".jsonl" else None, encoding="utf-8-sig") as f:
    if kind != ".jsonl":
      text = f.read()
      delimiter = _delimiter(kind, text.partition("\n")[0])
      # A tab-separated file's fields are taken as they are: in GLUE's, SICK's and STS-B's files a `"` is
      # text, and quote processing would join lines at an unbalanced one. A comma-separated file is quoted.
      quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
      reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting)
      header = None if numbered else next(reader, None)
      for fields in reader:
        if not fields:  # a blank line
          continue
        names = header if header is not None else [str(i) for i in range(len(fields))]
        # A short row's missing fields are None (as csv.DictReader gives them), so _columns names its line.
        rows.append({n: (fields[i] if i < len(fields) else None) for i, n in enumerate(names)})
        lines.append(reader.line_num)
      return rows, lines
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          row = json.loads(line)
        except ValueError as e:
          raise ValueError(f"{path} line {n}: not JSON ({e})") from e
        if numbered and isinstance(row, list):
          row = {str(i): v for i, v in enumerate(row)}
        elif numbered or not isinstance(row, dict):
          raise ValueError(f"{path} line {n}: not a JSON " + ("array (columns given by number)" if numbered
                                                              else "object"))
        rows.append(row)
        lines.append(n)
    return rows, lines


def _numbered(names: Sequence[str], spec: str) -> bool:
  """Whether a spec's columns are given by number (0-based, for a file without a header line); a mix of
  numbers and names is a one-line error."""
  digits = [n.isdigit() for n in names]
  if any(digits) and not all(digits):
    raise ValueError(f"{spec!r}: name every column (a header line) or number every one (0-based, no "
                     "header line), not both")
  return all(digits)


def file_task(spec: str, seed: int = 0) -> Task:
  """FILE.csv|.tsv|.jsonl:text_a[,text_b],label. 20% is held out as test (its dev is carved per seed)."""
  path, _, cols = spec.rpartition(":")
  names = cols.split(",")
  if not path or len(names) not in (2, 3):
    raise ValueError(f"task {spec!r}: use FILE:text_col,label_col or FILE:text_a,text_b,label_col")
  rows, lines = _task_rows(path, numbered=_numbered(names, spec))
  texts = _columns(rows, names[:-1], path, lines)
  labels_raw = _columns(rows, names[-1:], path, lines)[0]
  vocab = {l: i for i, l in enumerate(sorted(set(labels_raw)))}
  if len(vocab) < 2 or len(rows) < 10:
    raise ValueError(f"task file {path}: {len(rows)} rows with {len(vocab)} distinct labels in "
                     f"{names[-1]!r}; a task needs at least 10 rows and 2 labels")
  y = np.array([vocab[l] for l in labels_raw], np.int32)
  order = np.random.default_rng(seed).permutation(len(y))
  split = int(0.8 * len(y))
  whole = (texts[0], texts[1] if len(texts) == 2 else None, y)
  return Task(os.path.basename(path), take(whole, order[:split]), take(whole, order[split:]),
              labels=sorted(vocab))


def glue_task(name: str, limit: int = 20000) -> Task:
  """GLUE task `name` (a key of GLUE) from the hub: up to `limit` rows of train, and its validation split
  (mnli's matched one) as test."""
  import datasets
  cols, metric = GLUE[name]
  ds = datasets.load_dataset("glue", name)
  val = "validation_matched" if name == "mnli" else "validation"
  def part(split):
    d = ds[split].select(range(min(limit, len(ds[split]))))
    return (list(d[cols[0]]), list(d[cols[1]]) if len(cols) == 2 else None,
            np.array(d["label"], np.int32))
  return Task(f"glue:{name}", part("train"), part(val), metric)


# --- STS: text pairs with human similarity scores ----------------------------------------------------------

def sts_file(spec: str, min_pairs: int = 10) -> Pairs:
  """FILE.csv|.tsv|.jsonl:text_a,text_b,score: every row a pair of texts (any length, any script) with
  its human similarity score, a number on any scale. A missing column or value, a score that is not a
  finite number, and fewer than `min_pairs` rows or a single distinct score are one-line ValueErrors
  naming the file (and the line)."""
  path, _, cols = spec.rpartition(":")
  names = cols.split(",")
  if not path or len(names) != 3 or not all(n.strip() for n in names):
    raise ValueError(f"--sts {spec!r}: use FILE:text_a,text_b,score (the names of its three columns)")
  numbered = _numbered(names, f"--sts {spec}")
  rows, lines = _task_rows(path, "STS file", numbered)
  if not rows:
    raise ValueError(f"STS file {path}: no pairs (an empty file, or a header line only)")
  a, b, raw = _columns(rows, names, path, lines)
  score_N = np.zeros(len(raw), np.float64)
  for i, (r, line) in enumerate(zip(raw, lines)):
    try:
      score_N[i] = float(r)
    except ValueError:
      score_N[i] = float("nan")
    if not np.isfinite(score_N[i]):
      hint = " (a header line? name the columns instead of numbering them)" if numbered and i == 0 else ""
      raise ValueError(f"{path} line {line}: the score {r!r} in {_column(names[2])} is not a finite number"
                       + hint)
  if len(rows) < min_pairs or len(set(score_N.tolist())) < 2:
    raise ValueError(f"STS file {path}: {len(rows)} pairs with {len(set(score_N.tolist()))} distinct "
                     f"scores; a correlation needs at least {min_pairs} pairs and 2 scores")
  return Pairs(os.path.basename(path), a, b, score_N)


def sts_hub(name: str) -> Pairs:
  """An STS set of STS_HUB from the hub, through `datasets`; unreachable is a one-line ValueError."""
  import datasets
  path, config, split, cols = STS_HUB[name]
  try:
    ds = datasets.load_dataset(path, config, split=split)
  except Exception as e:  # the hub's errors are of many types; the user needs one line
    raise ValueError(f"--sts {name}: `datasets` could not load {path} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); give the pairs as a local "
                     "FILE:text_a,text_b,score instead") from None
  a, b, score = (list(ds[c]) for c in cols)
  return Pairs(name, [str(x) for x in a], [str(x) for x in b], np.asarray(score, np.float64))


def load_sts(spec: str) -> Pairs:
  """The STS set a --sts spec names: a key of STS_HUB, or a pair file (sts_file)."""
  if spec in STS_HUB:
    return sts_hub(spec)
  if spec.startswith("glue:"):
    raise ValueError(f"--sts {spec}: the STS sets on the hub are {', '.join(sorted(STS_HUB))}")
  return sts_file(spec)


def load_task(spec: str, seed: int = 0, docs: Optional[Sequence[str]] = None,
              protocol: Protocol = DEFAULT_PROTOCOL, package_roots: Sequence[str] = ()) -> Task:
  """The task a spec names: "nsp" (on `docs`, default the held-out text), "package", "glue:NAME" or a
  task file (file_task)."""
  if spec == "nsp":
    return nsp_task(corpus.heldout_docs() if docs is None else docs, seed, protocol.nsp_train,
                    protocol.nsp_test)
  if spec == "package":
    return package_task(package_roots, protocol.package_classes, protocol.package_per_class, seed)
  if spec.startswith("glue:"):
    if spec[5:] not in GLUE:
      raise ValueError(f"task {spec}: GLUE tasks are {', '.join(sorted(GLUE))}")
    return glue_task(spec[5:])
  return file_task(spec, seed)
