"""Evaluation users can trust: zero-shot probes, a labelled task made from the corpus, and fine-tuning
with a dev split and several seeds, for the students of one or several runs next to one set of
undistilled baselines. Every number comes with its standard error or its spread over seeds.

  minilm-eval --workdir A [--workdir B ...] [--out DIR] [--text SOURCE [--text-field F]] [--seeds 3]
              [--no-finetune] [--task glue:sst2] [--task FILE.csv:text_a,text_b,label]
              [--lr 1e-4 --lr 3e-4] [--epochs 3]
              [--site-packages DIR] [--no-baselines] [--curve [--curve-finetune]]

Models: the teacher, the assistant (a chain), each run's student, and the student's architecture without
distillation (random init, the first n teacher layers, every k-th teacher layer where that is not the
first n). Every model embeds
sentences the same way: its encoder, then the teacher's sentence-transformers pooling (mean when the
teacher is a plain BERT folder). Probes, on held-out text (the stdlib corpus's held-out split, or all of
--text) that no run trained on when it trained on the demo corpora's train split:
- retrieval: each query sentence (up to `queries`, 1,000, that have a successor in their document) ranks all the
  queries' successors by cosine; the mean reciprocal rank of its own successor (ties count half), SE over
  queries;
- agreement: Spearman correlation between the model's and the teacher's cosines over `pairs` (2,000) sentence pairs
  (half adjacent, half random), SE by bootstrap over pairs;
- held-out relation loss: the MiniLM relation loss (relations only, whatever the run trained with)
  against the teacher, SE over batches;
- package: which of 16 top-level installed packages a held-out docstring (by the content-hash rule that
  holds it out of `pydocs` training) comes from, balanced classes, split 60/20/20. Scored by a linear probe
  on frozen embeddings (L2 chosen on dev; binomial SE) and by fine-tuning;
- nsp: next-sentence prediction on the held-out text, by fine-tuning (trained on the first half of its
  documents, tested on the second; a text of one document is halved at its middle sentence).
Fine-tuning (encoder + the same pooling + linear head): for each lr, max(epochs) epochs with the schedule
over that length, dev scored after each epoch; the (lr, epoch) with the best dev score is kept and its
test score reported, so test is read once per seed and never chosen on. Repeated for `seeds` seeds: mean,
spread (sd over seeds) and SE (sd/sqrt(seeds)).

Cost measured on this machine's 2 shared CPU cores (another run training beside it): see
DEFAULT_PROTOCOL's comment.

Differences: each student against every other model, and the teacher against each baseline, paired over
the same items (queries, pairs, docstrings, test pairs), with the SE of the difference (paired_difference):
what "ahead by k standard errors" is read from.

Writes OUT/results.json (every raw number: per-item scores and predictions, per-seed scores, chosen
lr/epoch, dev grids, the differences), results.md (the table, then the differences) and results.png;
with --curve also curve.json and curve.png (the student of every kept checkpoint).
Checkpoints are opened read-only: evaluation writes nothing but OUT.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from minilm_jax import corpus, data, hf, losses, objective
from minilm_jax import workdir as wd
from minilm_jax.config import teacher_differs, teacher_identity
from minilm_jax.optimizer import decay_mask, warmup_linear_decay
from minilm_jax.student import init_student, teacher_init_layers, teacher_layer_index
from minilm_jax.model import BertConfig, encoder_for

# GLUE tasks: (hub config, text columns, metric). Loaded through `datasets` when the hub is reachable.
GLUE = {"sst2": (("sentence",), "accuracy"), "mnli": (("premise", "hypothesis"), "accuracy"),
        "qnli": (("question", "sentence"), "accuracy"), "qqp": (("question1", "question2"), "f1"),
        "rte": (("sentence1", "sentence2"), "accuracy"), "mrpc": (("sentence1", "sentence2"), "f1"),
        "cola": (("sentence",), "matthews")}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Every setting that changes a number; recorded in results.json (a curve must use the same)."""
  queries: int = 1000            # retrieval queries (candidates: their successors)
  pairs: int = 2000              # agreement pairs
  bootstrap: int = 200           # bootstrap resamples: agreement, and the paired differences
  sentence_len: int = 128        # max tokens when embedding a sentence or docstring
  package_classes: int = 16
  package_per_class: int = 50    # docstrings per class (balanced: the smallest chosen class may cap it)
  seeds: int = 3
  lrs: Tuple[float, ...] = (2e-4,)
  epochs: int = 2                # dev scored after each of 1..epochs
  nsp_train: int = 2000          # pairs, of which 20% become dev (fewer if the text has fewer)
  nsp_test: int = 1000
  finetune_len: int = 64
  batch: int = 32
  seed: int = 0                  # probe sampling


# Cost on this project's 2 CPU cores, alone: 38 minutes for the quality table (a 6x384 teacher, one 3x384
# student, three baselines); each 3x384 model ~6 minutes, the teacher ~12, most of it nsp (3 seeds x 2
# epochs x 1,600 pairs, then 400 dev and 1,000 test pairs; a 3x384 model fine-tunes at ~17 ms per example
# of 64 tokens). Each further student adds ~6 minutes. The zero-shot probes take ~25 s per student, and
# parsing site-packages for the package task 1-2.5 minutes once. nsp got 2,000 pairs (it had 500) because
# with 400 training pairs it lifted even the teacher only to 0.63 (0.56 on other text), within the seeds'
# spread of the baselines; with 1,600 the teacher reaches 0.77 and the seeds' sd is 0.01-0.02.
DEFAULT_PROTOCOL = Protocol()


@dataclasses.dataclass
class Task:
  name: str
  train: Tuple[List[str], Optional[List[str]], np.ndarray]   # text_a, text_b (or None), labels
  test: Tuple[List[str], Optional[List[str]], np.ndarray]
  metric: str = "accuracy"
  dev: Optional[Tuple[List[str], Optional[List[str]], np.ndarray]] = None  # None: carved per seed
  labels: Optional[List[str]] = None    # class names, where known


def _take(part, idx):
  a, b, y = part
  return [a[i] for i in idx], None if b is None else [b[i] for i in idx], y[idx]


def split_dev(task: Task, seed: int, frac: float = 0.2) -> Task:
  """`task` with a dev split: its own, or `frac` of its training part carved off with `seed`."""
  if task.dev is not None:
    return task
  order = np.random.default_rng([seed, 7]).permutation(len(task.train[2]))
  cut = max(1, int(frac * len(order)))
  return dataclasses.replace(task, train=_take(task.train, order[cut:]), dev=_take(task.train, order[:cut]))


# --- Held-out text ----------------------------------------------------------------------------------------

# Scripts written without spaces between words (Han, kana, Thai): their sentences end at a full-width
# stop with no space after it, and their length is counted in characters, since split() sees one word.
_UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])(?![」』）”’\"'])\s*")


def _sentences(doc: str) -> List[str]:
  """The sentences of `doc` with at least 4 words (8 characters of a script without spaces). A sentence
  ends at . ! ? followed by whitespace, or at 。！？ not followed by a closing quote (a stop inside a
  quotation does not end the sentence that quotes it)."""
  parts = (s.strip() for s in _SENTENCE_END.split(doc.replace("\n", " ")))
  return [s for s in parts if len(s.split()) >= 4 or len(re.findall(f"[{_UNSPACED}]", s)) >= 8]


def heldout_docs(text=None, text_field: str = "text") -> List[str]:
  """The probes' text: the stdlib corpus's held-out split, or all of `text` (any corpus.load_texts source;
  `text_field` names the text of a .jsonl/.parquet one)."""
  return corpus.load_texts("stdlib", split="heldout") if text is None else corpus.load_texts(text, text_field)


@dataclasses.dataclass
class ProbeText:
  """Sentences to embed once per model, and the probes as indices into them."""
  sentences: List[str]
  query_N: np.ndarray      # sentence index of each retrieval query
  cand_M: np.ndarray       # sentence index of each candidate (the queries' successors, unique)
  target_N: np.ndarray     # the candidate that follows query n
  pairs_P2: np.ndarray     # agreement pairs (sentence indices)


def probe_text(docs: Sequence[str], queries: int, pairs: int, seed: int) -> ProbeText:
  rng = np.random.default_rng(seed)
  succ = [(a, b) for d in docs for a, b in zip(_sentences(d), _sentences(d)[1:])]
  if len(succ) < 20:
    raise ValueError(f"the held-out text has {len(succ)} pairs of consecutive sentences; the probes "
                     "need at least 20")
  chosen = [succ[i] for i in rng.choice(len(succ), min(queries, len(succ)), replace=False)]
  index = {s: i for i, s in enumerate(dict.fromkeys(s for p in chosen for s in p))}
  query_N = np.array([index[a] for a, _ in chosen])
  cand_M = np.array(sorted({index[b] for _, b in chosen}))
  target_N = np.searchsorted(cand_M, [index[b] for _, b in chosen])
  adjacent = [(index[a], index[b]) for a, b in chosen[:pairs // 2]]
  n = len(index)
  rand = rng.integers(0, n, (pairs - len(adjacent), 2))
  rand = rand[rand[:, 0] != rand[:, 1]]
  return ProbeText(list(index), query_N, cand_M, target_N, np.array(adjacent + rand.tolist()))


# --- Statistics -------------------------------------------------------------------------------------------

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


def bootstrap_se(stat, x_N: np.ndarray, y_N: np.ndarray, reps: int, seed: int) -> float:
  """Standard error of stat(x, y) by resampling the N pairs with replacement `reps` times."""
  return _bootstrap(lambda i: stat(x_N[i], y_N[i]), len(x_N), reps, seed)


def _bootstrap(stat_of, n: int, reps: int, seed: int) -> float:
  """sd of stat_of(idx_N) over `reps` resamples idx_N of range(n) with replacement."""
  idx_RN = np.random.default_rng(seed).integers(0, n, (reps, n))
  return float(np.std([stat_of(i) for i in idx_RN], ddof=1))


def paired_difference(metric: str, a: dict, b: dict, teacher: Optional[dict], reps: int, seed: int
                      ) -> Optional[dict]:
  """a − b for one metric of two models scored on the same items, with the SE of that difference over
  the items (paired: what both models find hard cancels), or None when either lacks its items.
  - a mean over items (retrieval, the linear probe, the held-out loss): SE of the mean per-item difference;
  - agreement (a Spearman correlation with the teacher's cosines, `teacher`'s items): by bootstrap over
    the pairs, both models on the same resample;
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
    items_se = _bootstrap(lambda i: mean_score(pa_SN, i) - mean_score(pb_SN, i), len(y_N), reps, seed)
    seed_var = sum(x["spread"] ** 2 / len(x["seeds"]) for x in (a, b))
    return _difference(a["value"] - b["value"], math.sqrt(items_se ** 2 + seed_var), len(y_N))
  if "items" not in a or "items" not in b or len(a["items"]) != len(b["items"]):
    return None
  xa_N, xb_N = np.asarray(a["items"], np.float64), np.asarray(b["items"], np.float64)
  if metric == "agreement":
    if teacher is None or "items" not in teacher:
      return None
    t_N = np.asarray(teacher["items"], np.float64)
    diff = lambda i: spearman(xa_N[i], t_N[i]) - spearman(xb_N[i], t_N[i])
    return _difference(a["value"] - b["value"], _bootstrap(diff, len(t_N), reps, seed), len(t_N))
  d_N = xa_N - xb_N
  return _difference(float(d_N.mean()), float(d_N.std(ddof=1) / np.sqrt(len(d_N))), len(d_N))


def _difference(d: float, se: float, n: int) -> dict:
  z = d / se if se > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
  return {"value": d, "se": se, "n": n, "z": z}


def comparisons(results: dict, reps: int, seed: int) -> Dict[str, Dict[str, dict]]:
  """{"A − B": {metric: difference}} for each student against every other model, and for the teacher
  (and the assistant) against each baseline: what a claim that one model beats another rests on."""
  names = list(results)
  students = [n for n in names if n.startswith("student")]
  baselines = [n for n in names if n.startswith("baseline")]
  pairs = [(s, o) for s in students for o in names if o != s]
  pairs += [(t, bl) for t in names if t in ("teacher", "assistant") for bl in baselines]
  teacher = results.get("teacher", {}).get("agreement")
  out = {}
  for a, b in pairs:
    row = {}
    for m in _metrics(results):
      if m in results[a] and m in results[b]:
        d = paired_difference(m, results[a][m], results[b][m], teacher, reps, seed)
        if d is not None:
          row[m] = d
    out[f"{a} − {b}"] = row
  return out


def cosines(a_ND: np.ndarray, b_MD: np.ndarray) -> np.ndarray:
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


def _mean_se(x_N) -> dict:
  """Mean and SE of per-item values, kept as "items" so that two models scored on the same items can be
  compared pairwise (paired_difference)."""
  x_N = np.asarray(x_N, np.float64)
  return {"value": float(x_N.mean()), "se": float(x_N.std(ddof=1) / np.sqrt(len(x_N))), "n": len(x_N),
          "items": x_N.tolist()}


# --- Sentence embeddings ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _embed_fn(config: BertConfig, pooling: Tuple[str, bool]):
  def f(params, ids_BT, mask_BT):
    h_BTD = encoder_for(config).apply({"params": params}, ids_BT, mask_BT).last_hidden_state
    return losses.sentence_embedding(h_BTD, mask_BT, *pooling)
  return jax.jit(f)


def embed(config: BertConfig, params, tok, texts: Sequence[str], pooling: Tuple[str, bool],
          max_len: int = 128, batch: int = 64) -> np.ndarray:
  """e_ND [len(texts), hidden]: the model's sentence embeddings. Texts are sorted by length and padded to
  a power of two (≥ 16), so short sentences do not pay for 128 tokens and few shapes get compiled."""
  max_len = min(max_len, config.max_position_embeddings)  # beyond its positions a model reads garbage
  enc = tok(list(texts), truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
  order = np.argsort([len(t) for t in enc], kind="stable")
  f = _embed_fn(config, tuple(pooling))
  out_ND = np.zeros((len(texts), config.hidden_size), np.float32)
  for i in range(0, len(order), batch):
    idx = order[i:i + batch]
    width = max(16, 1 << (max(len(enc[j]) for j in idx) - 1).bit_length())
    ids_BT = np.full((batch, width), tok.pad_token_id, np.int32)
    mask_BT = np.zeros((batch, width), np.int32)
    for r, j in enumerate(idx):
      ids_BT[r, :len(enc[j])], mask_BT[r, :len(enc[j])] = enc[j], 1
    out_ND[idx] = np.asarray(f(params, ids_BT, mask_BT))[:len(idx)]
  return out_ND


# --- Zero-shot probes ------------------------------------------------------------------------------------

def retrieval(e_ND: np.ndarray, p: ProbeText) -> dict:
  """MRR of each query's successor among all candidates, SE over queries."""
  exclude_NM = p.cand_M[None, :] == p.query_N[:, None]  # a query that is also another's successor
  return _mean_se(reciprocal_ranks(e_ND[p.query_N], e_ND[p.cand_M], p.target_N, exclude_NM))


def pair_cosines(e_ND: np.ndarray, pairs_P2: np.ndarray) -> np.ndarray:
  u_ND = e_ND / np.maximum(np.linalg.norm(e_ND, axis=-1, keepdims=True), 1e-12)
  return (u_ND[pairs_P2[:, 0]] * u_ND[pairs_P2[:, 1]]).sum(-1)


def agreement(e_ND: np.ndarray, t_ND: np.ndarray, p: ProbeText, reps: int, seed: int) -> dict:
  """Spearman correlation of the model's and the teacher's cosines over the pairs; bootstrap SE."""
  m_P, t_P = pair_cosines(e_ND, p.pairs_P2), pair_cosines(t_ND, p.pairs_P2)
  return {"value": spearman(m_P, t_P), "se": bootstrap_se(spearman, m_P, t_P, reps, seed), "n": len(m_P),
          "items": m_P.tolist()}  # the model's cosines: the teacher's are the teacher row's


# --- Tasks ------------------------------------------------------------------------------------------------

def nsp_pairs(docs: Sequence[str], seed: int) -> Tuple[List[str], List[str], np.ndarray]:
  """Next-sentence prediction from raw text: for each sentence with a successor, (s_i, s_i+1) is 1 and
  (s_i, a random sentence of another document) is 0, so the classes are exactly balanced."""
  return _nsp_pairs([_sentences(d) for d in docs], seed)


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
  sents = [_sentences(d) for d in docs]
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


def _columns(rows: List[dict], cols: Sequence[str], where: str, lines: Sequence[int]):
  """The named columns of every row as strings; a row without one (or with it empty: a short CSV line)
  is a one-line error naming its line."""
  for c in cols:
    if rows and c not in rows[0]:
      raise ValueError(f"{where}: no column {c!r} (columns: {sorted(rows[0])})")
  for i, r in enumerate(rows):
    missing = [c for c in cols if r.get(c) is None]
    if missing:
      raise ValueError(f"{where} line {lines[i]}: no value for {missing[0]!r}")
  return [[str(r[c]) for r in rows] for c in cols]


def _task_rows(path: str) -> Tuple[List[dict], List[int]]:
  """The rows of a .csv/.tsv (header first) or .jsonl file, and the line each is on. A UTF-8
  byte-order mark (a spreadsheet's export) is dropped."""
  import csv
  kind = os.path.splitext(path)[1].lower()
  if kind not in (".csv", ".tsv", ".jsonl"):
    raise ValueError(f"task file {path}: use a .csv, .tsv (a header line first) or .jsonl file")
  rows, lines = [], []
  with open(path, newline="" if kind != ".jsonl" else None, encoding="utf-8-sig") as f:
    if kind != ".jsonl":
      reader = csv.DictReader(f, delimiter="," if kind == ".csv" else "\t")
      for r in reader:
        rows.append(r)
        lines.append(reader.line_num)
      return rows, lines
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except ValueError as e:
          raise ValueError(f"{path} line {n}: not JSON ({e})") from e
        if not isinstance(rows[-1], dict):
          raise ValueError(f"{path} line {n}: not a JSON object")
        lines.append(n)
    return rows, lines


def file_task(spec: str, seed: int = 0) -> Task:
  """FILE.csv|.tsv|.jsonl:text_a[,text_b],label. 20% is held out as test (its dev is carved per seed)."""
  path, _, cols = spec.rpartition(":")
  names = cols.split(",")
  if not path or len(names) not in (2, 3):
    raise ValueError(f"task {spec!r}: use FILE:text_col,label_col or FILE:text_a,text_b,label_col")
  try:
    rows, lines = _task_rows(path)
  except UnicodeDecodeError as e:
    raise ValueError(f"task file {path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
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
  return Task(os.path.basename(path), _take(whole, order[:split]), _take(whole, order[split:]),
              labels=sorted(vocab))


def glue_task(name: str, limit: int = 20000) -> Task:
  import datasets
  cols, metric = GLUE[name]
  ds = datasets.load_dataset("glue", name)
  val = "validation_matched" if name == "mnli" else "validation"
  def part(split):
    d = ds[split].select(range(min(limit, len(ds[split]))))
    return (list(d[cols[0]]), list(d[cols[1]]) if len(cols) == 2 else None,
            np.array(d["label"], np.int32))
  return Task(f"glue:{name}", part("train"), part(val), metric)


def load_task(spec: str, seed: int = 0, docs: Optional[Sequence[str]] = None,
              protocol: Protocol = DEFAULT_PROTOCOL, package_roots: Sequence[str] = ()) -> Task:
  if spec == "nsp":
    return nsp_task(heldout_docs() if docs is None else docs, seed, protocol.nsp_train, protocol.nsp_test)
  if spec == "package":
    return package_task(package_roots, protocol.package_classes, protocol.package_per_class, seed)
  if spec.startswith("glue:"):
    if spec[5:] not in GLUE:
      raise ValueError(f"task {spec}: GLUE tasks are {', '.join(sorted(GLUE))}")
    return glue_task(spec[5:])
  return file_task(spec, seed)


def score(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
  if metric == "accuracy":
    return float((y == pred).mean())
  if metric == "f1":
    tp, fp, fn = ((pred == 1) & (y == 1)).sum(), ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum()
    return float(2 * tp / max(2 * tp + fp + fn, 1))
  tp, tn = ((pred == 1) & (y == 1)).sum(), ((pred == 0) & (y == 0)).sum()
  fp, fn = ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum()
  den = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  return float((tp * tn - fp * fn) / den) if den else 0.0


# --- Linear probe ----------------------------------------------------------------------------------------

def linear_probe(train_e: Tuple[np.ndarray, np.ndarray], dev_e: Tuple[np.ndarray, np.ndarray],
                 test_e: Tuple[np.ndarray, np.ndarray], l2s: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
                 steps: int = 300, lr: float = 0.05) -> dict:
  """Multinomial logistic regression on frozen embeddings ((e_ND, y_N) per split), fitted on train by
  full-batch Adam for each L2 strength at once; the strength with the best dev accuracy is scored on
  test (SE sqrt(p(1-p)/n)). Features are standardised with train statistics: models differ in scale."""
  (x_tr, y_tr), (x_dev, y_dev), (x_te, y_te) = train_e, dev_e, test_e
  mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
  z = lambda x: jnp.asarray((x - mu) / sd, jnp.float32)
  c = int(max(y_tr.max(), y_dev.max(), y_te.max())) + 1
  tx = optax.adam(lr)

  def fit(l2):
    def loss(w):
      logits = z(x_tr) @ w["W"] + w["b"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y_tr)).mean()
      return ce + l2 * (w["W"] ** 2).sum()
    def body(_, carry):
      w, opt = carry
      u, opt = tx.update(jax.grad(loss)(w), opt)
      return optax.apply_updates(w, u), opt
    w = {"W": jnp.zeros((x_tr.shape[1], c)), "b": jnp.zeros((c,))}
    return jax.lax.fori_loop(0, steps, body, (w, tx.init(w)))[0]

  w = jax.jit(jax.vmap(fit))(jnp.asarray(l2s, jnp.float32))
  right = lambda x, y: np.asarray((z(x) @ w["W"] + w["b"][:, None]).argmax(-1) == y)  # [L2s, N]
  dev_acc = right(x_dev, y_dev).mean(-1)
  best = int(np.argmax(dev_acc))  # the first of equals: the weakest penalty
  right_N = right(x_te, y_te)[best].astype(np.float64)
  p = float(right_N.mean())
  return {"value": p, "se": math.sqrt(p * (1 - p) / len(y_te)), "n": len(y_te), "l2": float(l2s[best]),
          "dev": [float(a) for a in dev_acc], "items": right_N.tolist()}


# --- Fine-tuning ----------------------------------------------------------------------------------------

class Classifier(nn.Module):
  """Encoder, the evaluation's sentence pooling (without normalisation), dropout, linear head."""
  config: BertConfig
  num_labels: int
  pooling: str = "mean"

  @nn.compact
  def __call__(self, ids, mask, types, deterministic):
    h = encoder_for(self.config, name="encoder")(ids, mask, types, deterministic=deterministic).last_hidden_state
    pooled = losses.sentence_embedding(h, mask, self.pooling)
    pooled = nn.Dropout(0.1)(pooled, deterministic=deterministic)
    return nn.Dense(self.num_labels, name="head")(pooled)


def _encode(tok, a, b, max_len):
  enc = tok(a, b, truncation=True, max_length=max_len, padding="max_length", return_tensors="np")
  types = enc.get("token_type_ids", np.zeros_like(enc["input_ids"]))
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32), types.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _predict_fn(model: Classifier):
  return jax.jit(lambda v, x: model.apply({"params": v}, *x, True).argmax(-1))


@functools.lru_cache(maxsize=8)
def _train_step(model: Classifier, total: int):
  """(tx, step), cached so models of one shape share the compile: AdamW on a unit-peak warmup/linear-decay schedule over `total` steps, the update scaled
  by the lr argument (AdamW's decoupled decay scales with lr too, so this is AdamW at that lr)."""
  tx = optax.adamw(warmup_linear_decay(1.0, total // 10, total), weight_decay=0.01,
                   mask=decay_mask)

  @jax.jit
  def step(v, opt, x, y, k, lr):
    def loss(v):
      logits = model.apply({"params": v}, *x, False, rngs={"dropout": k})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    u, opt = tx.update(jax.grad(loss)(v), opt, v)
    return optax.apply_updates(v, jax.tree.map(lambda a: lr * a, u)), opt
  return tx, step


def finetune(config: BertConfig, params, tok, task: Task, lrs: Sequence[float] = (1e-4, 3e-4),
             epochs: int = 3, seeds: int = 3, batch: int = 32, max_len: int = 64, pooling: str = "mean",
             log=lambda m: None) -> dict:
  """The fine-tuning protocol on `task` (see the module docstring). Per seed: a dev split (the task's,
  or 20% of its train part), for each lr `epochs` epochs on one schedule with dev scored after each, the
  params of the best dev (lr, epoch) kept, and test scored once with those. Returns the mean test score
  over seeds, its spread (sd over seeds) and SE, and every seed's dev grid, choice and test score."""
  n_labels = int(max(task.train[2].max(), task.test[2].max())) + 1
  max_len = min(max_len, config.max_position_embeddings)
  model = Classifier(config, n_labels, pooling)
  xte = _encode(tok, *task.test[:2], max_len)
  predict = _predict_fn(model)
  def run(v, x, n, chunk=128):  # fixed-size chunks (the last padded): one compile
    pad = lambda a: np.concatenate([a, np.zeros((-len(a) % chunk, *a.shape[1:]), a.dtype)])
    x = tuple(pad(a) for a in x)
    return np.concatenate([np.asarray(predict(v, tuple(a[i:i + chunk] for a in x)))
                           for i in range(0, len(x[0]), chunk)])[:n]
  fns = {}
  per_seed = []
  for seed in range(seeds):
    t = split_dev(task, seed)
    xtr, xdev = _encode(tok, *t.train[:2], max_len), _encode(tok, *t.dev[:2], max_len)
    ytr, ydev = t.train[2], t.dev[2]
    per_epoch = max(1, -(-len(ytr) // batch))
    total = epochs * per_epoch
    if total not in fns:  # one compile per schedule length; lr is an argument
      fns[total] = _train_step(model, total)
    tx, step = fns[total]
    head = model.init(jax.random.key(seed), *[x[:1] for x in xtr], True)["params"]
    grid, best = [], None
    for lr in lrs:
      v = {**head, "encoder": jax.tree.map(jnp.asarray, params)}
      opt = tx.init(v)
      rng = np.random.default_rng([seed, len(grid)])
      for ep in range(1, epochs + 1):
        perm = rng.permutation(len(ytr))
        perm = np.concatenate([perm, rng.choice(len(ytr), per_epoch * batch - len(ytr))])  # full batches
        for s in range(per_epoch):
          idx = perm[s * batch:(s + 1) * batch]
          k = jax.random.fold_in(jax.random.key(seed), (ep - 1) * per_epoch + s)
          v, opt = step(v, opt, tuple(x[idx] for x in xtr), ytr[idx], k, lr)
        dev = score(task.metric, ydev, run(v, xdev, len(ydev)))
        grid.append({"lr": lr, "epoch": ep, "dev": dev})
        if best is None or dev > best[0]:  # strictly better: the first of equals is kept
          best = (dev, lr, ep, jax.device_get(v))
    dev, lr, ep, v = best
    pred = run(v, xte, len(task.test[2]))  # the one test read
    test = score(task.metric, task.test[2], pred)
    per_seed.append({"seed": seed, "lr": lr, "epoch": ep, "dev": dev, "test": test, "dev_grid": grid,
                     "test_pred": pred.tolist()})
    log(f"  {task.name} seed {seed}: lr {lr:g}, epoch {ep}: dev {dev:.3f}, test {test:.3f}")
  tests = np.array([s["test"] for s in per_seed])
  spread = float(tests.std(ddof=1)) if seeds > 1 else 0.0
  return {"value": float(tests.mean()), "spread": spread, "se": spread / math.sqrt(seeds),
          "n": len(task.test[2]), "n_train": len(task.train[2]), "metric": task.metric,
          "test_labels": task.test[2].tolist(), "seeds": per_seed}


# --- Held-out relation loss -------------------------------------------------------------------------------

def heldout_relation_loss(cfg, teacher: Tuple[BertConfig, dict], student: Tuple[BertConfig, dict],
                          rows: Dict[str, np.ndarray], batches: int = 8, batch: int = 16) -> dict:
  """The MiniLM relation loss (relations only, whatever terms the run trained with) of `student` against
  `teacher` on `rows`: mean and SE over `batches` batches."""
  tcfg, tparams = teacher
  scfg, sparams = student
  tl = teacher_layer_index(cfg.loss.teacher_layer, tcfg.num_hidden_layers)
  loss = jax.jit(objective.distill_loss_fn(cfg, encoder_for(tcfg), encoder_for(scfg), tl,
                                           terms=("relations",)))
  n = min(batches, max(1, len(rows["input_ids"]) // batch))
  vals = [float(loss(sparams, tparams, {k: v[i * batch:(i + 1) * batch] for k, v in rows.items()}))
          for i in range(n)]
  return {"value": float(np.mean(vals)), "se": float(np.std(vals, ddof=1) / np.sqrt(n)) if n > 1 else
          float("nan"), "n": n, "items": vals}


# --- Runs, read-only -------------------------------------------------------------------------------------

def open_checkpoints(workdir: str):
  """WORKDIR/checkpoints opened read-only (checkpoint.open_read_only), or None if there are none."""
  from minilm_jax import checkpoint
  ckpts = wd.join(workdir, wd.CHECKPOINTS)
  return checkpoint.open_read_only(ckpts) if wd.exists(ckpts) else None


def check_out(out: str, workdirs: Sequence[str]) -> None:
  """An evaluation writes only to its output folder, never into a run it reads (its eval/ excepted)."""
  o = os.path.realpath(out)
  inside = lambda path, folder: path == folder or path.startswith(folder + os.sep)
  for w in workdirs:
    if wd.is_remote(w) or not inside(o, os.path.realpath(w)):
      continue
    if not inside(o, os.path.realpath(wd.eval_dir(w))):
      raise ValueError(f"--out {out} is inside the run {w}, which minilm-eval only reads: write the "
                       f"results elsewhere, or leave out --out for {wd.eval_dir(w)}")


def read_run(workdir: str):
  """(config, meta, manager, latest step) of a minilm-distill workdir, read-only."""
  import ml_collections
  from minilm_jax import checkpoint
  mngr = open_checkpoints(workdir)
  step = mngr.latest_step() if mngr else None
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint; is this a minilm-distill workdir?")
  meta = checkpoint.read_meta(mngr, step)
  return ml_collections.ConfigDict(meta["config"]), meta, mngr, step


def checkpoint_student(workdir: str, step: int):
  """(config, params) of the student saved at `step` of a run, also one still training (no exported
  student yet): the config from the checkpoint's own record, so any depth or width the run had."""
  from minilm_jax import checkpoint
  from minilm_jax.model import config_from_dict
  _, meta, mngr, _ = read_run(workdir)
  if step not in mngr.all_steps():
    raise FileNotFoundError(f"{workdir} has no checkpoint at step {step} (it has {sorted(mngr.all_steps())})")
  meta = checkpoint.read_meta(mngr, step)
  return (config_from_dict(meta["student_config"]),
          objective.student_params(checkpoint.restore_params(mngr, step)))


def run_teacher_dir(meta: dict, workdir: str, teacher: Optional[str] = None) -> str:
  """The local folder of the teacher a run recorded in its checkpoint `meta`: `teacher` when given
  (minilm-eval --teacher), else the path where the run found it, else the run's config.teacher resolved
  on this machine (a hub id, the packaged copy, a gs:// folder), so that a run distilled on a TPU VM or
  a GPU box can be evaluated where its teacher lives elsewhere. Whichever it is must hold the recorded
  teacher (sha256 of config and weights, and of the tokenizer where recorded): another is a ValueError,
  since a table against another teacher would be wrong without saying so. FileNotFoundError if none."""
  rec, named = meta["teacher"], meta["config"].get("teacher", "")
  if teacher is None and os.path.isdir(rec["path"]):
    folder = rec["path"]
  else:
    try:
      folder = hf.resolve(teacher if teacher is not None else named)
    except FileNotFoundError as e:
      if teacher is not None:
        raise
      also = "" if os.path.abspath(named) == rec["path"] else \
          f", and its config's teacher {named!r} is not found here either ({e})"
      raise FileNotFoundError(f"{workdir} was distilled from the teacher at {rec['path']}, which is not on "
                              f"this machine{also}: give its folder with --teacher DIR") from None
  differs = teacher_differs(rec, teacher_identity(folder, hf.load_config(folder)))
  if differs:
    raise ValueError(f"{folder} is not the teacher {workdir} was distilled from: its {differs} differ from "
                     f"the run's (recorded from {rec['path']}); give the run's teacher with --teacher DIR")
  return folder


def student_name(workdir: str) -> str:
  return f"student: {os.path.basename(os.path.normpath(workdir))}"


BASELINE_NAMES = {"random": "baseline: random init", "teacher_first": "baseline: first teacher layers",
                  "teacher": "baseline: every k-th teacher layer"}


def baseline_inits(teacher_layers: int, student_layers: int) -> List[str]:
  """The student inits that make the undistilled baselines. Every k-th layer is left out where it is the
  first n layers (k = 1: 6 → 4 layers, 12 → 8): the same model, scored once."""
  same = teacher_init_layers("teacher", teacher_layers, student_layers) == \
      teacher_init_layers("teacher_first", teacher_layers, student_layers)
  return ["random", "teacher_first"] + ([] if same else ["teacher"])


def models_of_runs(workdirs: Sequence[str], baselines: bool = True, teacher: Optional[str] = None):
  """(cfg, {name: (config, params)}, teacher_dir) for the teacher, the assistant (if a chain), each run's
  student and the undistilled baselines of the students' architecture (once). The runs must share the
  teacher and the student config. cfg is the first run's. `teacher`: see run_teacher_dir."""
  import ml_collections
  from minilm_jax import checkpoint
  runs = [read_run(w) for w in workdirs]
  cfg, meta = runs[0][0], runs[0][1]
  for w, (_, m, _, _) in zip(workdirs[1:], runs[1:]):
    if m["teacher"]["sha256"] != meta["teacher"]["sha256"]:
      raise ValueError(f"{w} was distilled from another teacher than {workdirs[0]} "
                       f"({m['teacher']['path']} vs {meta['teacher']['path']}); compare runs of one teacher")
    if m["student_config"] != meta["student_config"]:
      diff = sorted(k for k in set(m["student_config"]) | set(meta["student_config"])
                    if m["student_config"].get(k) != meta["student_config"].get(k))
      raise ValueError(f"{w} has another student shape than {workdirs[0]} ({', '.join(diff)} differ); "
                       "compare runs of one student shape")
  models = {}
  a_dir = wd.join(workdirs[0], wd.ASSISTANT)
  a_mngr = open_checkpoints(a_dir)
  if a_mngr is not None and a_mngr.latest_step() is not None:  # a chain: the teacher is the assistant's
    a_meta = checkpoint.read_meta(a_mngr, a_mngr.latest_step())
    teacher_dir = run_teacher_dir(a_meta, a_dir, teacher)
    models["teacher"] = hf.load_pretrained(teacher_dir)
    # The student stage's teacher is the chain's own assistant, exported in WORKDIR/assistant.
    models["assistant"] = hf.load_pretrained(run_teacher_dir(meta, workdirs[0], wd.local_student(a_dir)))
    cfg.loss.teacher_layer = a_meta["config"]["loss"]["teacher_layer"]
  else:
    teacher_dir = run_teacher_dir(meta, workdirs[0], teacher)
    models["teacher"] = hf.load_pretrained(teacher_dir)
  names = [student_name(w) for w in workdirs]
  if len(set(names)) < len(names):
    names = [f"student: {w}" for w in workdirs]
  for name, w in zip(names, workdirs):
    encoder, sparams = hf.load_student(wd.local_student(w))
    models[name] = (encoder.config, objective.student_params(sparams))
  if baselines:
    tcfg, tparams = models["teacher"]
    for init in baseline_inits(tcfg.num_hidden_layers, cfg.student.num_layers):
      c = ml_collections.ConfigDict(cfg.to_dict())
      c.student.init = init
      name = BASELINE_NAMES[init]
      p = init_student(c, encoder.config, jax.tree.map(jnp.asarray, tparams),
                             tcfg.num_hidden_layers, jax.random.key(cfg.seed))
      models[name] = (encoder.config, jax.device_get(p))
  return cfg, models, teacher_dir


# --- Putting it together -----------------------------------------------------------------------------------

def encode_speed(config: BertConfig, params, batch: int = 32, seq: int = 128, reps: int = 3) -> float:
  """Encoding tokens/s of a jitted forward pass on this machine (noisy on shared CPUs; in the JSON)."""
  f = jax.jit(lambda p, ids: encoder_for(config).apply({"params": p}, ids).last_hidden_state)
  ids = jnp.ones((batch, seq), jnp.int32)
  f(params, ids).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(params, ids).block_until_ready()
  return batch * seq * reps / (time.perf_counter() - t)


@dataclasses.dataclass
class Bench:
  """What every model is scored on, prepared once."""
  cfg: object
  tok: object
  pooling: Tuple[str, bool]
  teacher: Tuple[BertConfig, dict]
  probe: ProbeText
  rows: Dict[str, np.ndarray]
  package: Task
  tasks: Dict[str, Task]      # fine-tuning tasks (empty: no fine-tuning)
  protocol: Protocol
  teacher_e: Optional[np.ndarray] = None


def make_bench(cfg, tok, teacher, teacher_dir, protocol: Protocol, text=None, tasks=("nsp", "package"),
               package_roots: Sequence[str] = (), text_field: str = "text") -> Bench:
  docs = heldout_docs(text, text_field)
  p = protocol
  # What the text can refuse first: parsing the package task's site-packages takes minutes.
  probe = probe_text(docs, p.queries, p.pairs, p.seed)
  loaded = {t: load_task(t, p.seed, docs, p, package_roots) for t in tasks if t != "package"}
  pkg = package_task(package_roots, p.package_classes, p.package_per_class, p.seed)
  loaded = {t: pkg if t == "package" else loaded[t] for t in tasks}
  b = Bench(cfg, tok, hf.sentence_pooling(teacher_dir) or ("mean", False), teacher, probe,
            data.tokenize_and_pack(docs[:2000], tok, cfg.data.max_len), pkg, loaded, p)
  b.teacher_e = embed(*teacher, tok, b.probe.sentences, b.pooling, p.sentence_len)
  return b


def quality(b: Bench, model: Tuple[BertConfig, dict], is_teacher: bool = False, finetune_too=True,
            log=lambda m: None) -> dict:
  """Every metric of one model: {metric: {"value", "se" | "spread", ...}}."""
  mcfg, params = model
  p = b.protocol
  row = {}
  if not is_teacher and mcfg.hidden_size % b.cfg.loss.relation_heads == 0:
    row["heldout_relation_loss"] = heldout_relation_loss(b.cfg, b.teacher, model, b.rows)
  e_ND = b.teacher_e if is_teacher else embed(mcfg, params, b.tok, b.probe.sentences, b.pooling,
                                              p.sentence_len)
  row["retrieval_mrr"] = retrieval(e_ND, b.probe)
  row["agreement"] = {"value": 1.0, "se": 0.0, "n": len(b.probe.pairs_P2),
                      "items": pair_cosines(e_ND, b.probe.pairs_P2).tolist()} if is_teacher else \
      agreement(e_ND, b.teacher_e, b.probe, p.bootstrap, p.seed)
  pk = b.package
  parts = [embed(mcfg, params, b.tok, t[0], b.pooling, p.sentence_len) for t in (pk.train, pk.dev, pk.test)]
  row["package_linear"] = linear_probe(*[(e, t[2]) for e, t in zip(parts, (pk.train, pk.dev, pk.test))])
  if finetune_too:
    for name, task in b.tasks.items():
      row[name] = finetune(mcfg, params, b.tok, task, p.lrs, p.epochs, p.seeds, p.batch, p.finetune_len,
                           b.pooling[0], log)
  return row


LABELS = {"heldout_relation_loss": "held-out relation loss", "retrieval_mrr": "retrieval MRR",
          "agreement": "agreement with teacher (Spearman)", "package_linear": "package: linear probe acc",
          "package": "package: fine-tune acc", "nsp": "nsp: fine-tune acc"}


def _fmt(m: dict) -> str:
  """value ± error, the error to 2 significant digits and the value to the same decimals (≥ 3)."""
  err = m.get("spread", m.get("se"))
  if err is None or not np.isfinite(err) or err <= 0:
    d = 3
  else:
    d = int(min(6, max(3, 1 - math.floor(math.log10(err)))))
  return f"{m['value']:.{d}f} ± {err if err is not None and np.isfinite(err) else float('nan'):.{d}f}"


def _fmt_difference(d: dict) -> str:
  return f"{'+' if d['value'] >= 0 else ''}{_fmt(d)} ({d['z']:+.1f} SE)"


def write_table(results: dict, metrics: Sequence[str], seeds: int, md: str,
                differences: Optional[Dict[str, Dict[str, dict]]] = None) -> None:
  head = [LABELS.get(m, f"{m}: fine-tune") + (f" (± sd, {seeds} seeds)" if _is_finetune(m) else " (± SE)")
          for m in metrics]
  lines = ["| model | size | " + " | ".join(head) + " |", "| --- " * (len(metrics) + 2) + "|"]
  for name, row in results.items():
    cells = [_fmt(row[m]) if m in row else "" for m in metrics]
    size = f"{row['layers']}×{row['hidden']}, {row['params_M']:.1f}M params"
    lines.append(f"| {name} | {size} | " + " | ".join(cells) + " |")
  edge = last_epoch_everywhere(results)
  if edge:
    lines += ["", "Every seed chose the last epoch of its fine-tuning grid (dev was still rising, so the score "
              "may be short of what the model can reach; a larger --epochs tells): " + "; ".join(edge) + "."]
  if differences:
    cols = [m for m in metrics if any(m in row for row in differences.values())]
    lines += ["", "Differences, paired over the same items (± their SE; in SE). Fine-tuning: the SE counts "
              "the test items as a sample and the seeds' spread (see evaluate.paired_difference).", "",
              "| difference | " + " | ".join(LABELS.get(m, f"{m}: fine-tune") for m in cols) + " |",
              "| --- " * (len(cols) + 1) + "|"]
    for name, row in differences.items():
      lines.append(f"| {name} | " + " | ".join(_fmt_difference(row[m]) if m in row else "" for m in cols)
                   + " |")
  with open(md, "w") as f:
    f.write("\n".join(lines) + "\n")


def last_epoch_everywhere(results: dict) -> List[str]:
  """'model: task' for each fine-tuning result in which every seed's best dev score came at the last
  epoch of its grid: the protocol may have stopped before the model's best."""
  return [f"{name}: {m}" for name, row in results.items() for m, v in row.items()
          if isinstance(v, dict) and v.get("seeds") and
          all(s["epoch"] == max(g["epoch"] for g in s["dev_grid"]) for s in v["seeds"])]


def _is_finetune(metric: str) -> bool:
  return metric not in ("heldout_relation_loss", "retrieval_mrr", "agreement", "package_linear")


def _metrics(results: dict) -> List[str]:
  return list(dict.fromkeys(m for row in results.values() for m, v in row.items() if isinstance(v, dict)))


def evaluate_run(workdirs, out: Optional[str] = None, text=None, tasks: Sequence[str] = (),
                 protocol: Protocol = DEFAULT_PROTOCOL, finetune_too: bool = True, baselines: bool = True,
                 package_roots: Sequence[str] = (), text_field: str = "text", log=print,
                 teacher: Optional[str] = None) -> dict:
  """Every model of the runs (one teacher, the runs' students, one set of baselines) on every probe.
  Fine-tuning tasks: nsp, package and `tasks`. Writes OUT/results.{json,md,png}; OUT defaults to
  WORKDIR/eval for one run and must be given for several. `teacher`: see run_teacher_dir."""
  from transformers import AutoTokenizer
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  if not workdirs:
    raise ValueError("give at least one --workdir")
  if out is None:
    if len(workdirs) > 1:
      raise ValueError("several runs: give --out DIR for the shared table")
    out = wd.eval_dir(workdirs[0])
  check_out(out, workdirs)
  cfg, models, teacher_dir = models_of_runs(workdirs, baselines, teacher)
  tok = AutoTokenizer.from_pretrained(wd.local_student(workdirs[0]))
  ft = list(dict.fromkeys(["nsp", "package", *tasks])) if finetune_too else []
  t0 = time.time()
  b = make_bench(cfg, tok, models["teacher"], teacher_dir, protocol, text, ft, package_roots, text_field)
  results = {}
  for name, (mcfg, params) in models.items():
    t = time.time()
    row = {"layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size,
           "params_M": sum(np.size(x) for x in jax.tree.leaves(params)) / 1e6,
           "encode_tokens_per_s": encode_speed(mcfg, params)}
    row.update(quality(b, (mcfg, params), name == "teacher", finetune_too, log))
    row["eval_seconds"] = time.time() - t
    log(f"{name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if isinstance(v, dict)) +
        f" ({row['eval_seconds']:.0f}s)")
    results[name] = row
  os.makedirs(out, exist_ok=True)
  settings = settings_of(protocol, text, ft, package_roots, text_field)
  diffs = comparisons(results, protocol.bootstrap, protocol.seed)
  hf._write_json(os.path.join(out, "results.json"), {
      "workdirs": workdirs, "teacher": teacher_dir, "pooling": list(b.pooling), "settings": settings,
      "package_labels": b.package.labels, "seconds": time.time() - t0, "results": results,
      "differences": diffs})
  write_table(results, _metrics(results), protocol.seeds, os.path.join(out, "results.md"), diffs)
  _bar_chart(results, _metrics(results), os.path.join(out, "results.png"))
  return results


def settings_of(protocol: Protocol, text, tasks, package_roots, text_field: str = "text") -> dict:
  """What a table records of how it was evaluated (results.json's "settings"), as JSON would read it."""
  return json.loads(json.dumps({"protocol": dataclasses.asdict(protocol), "tasks": list(tasks),
                                "text": text if text is None or isinstance(text, str) else "in-memory",
                                "text_field": text_field, "package_roots": list(package_roots)}))


def made_with(made: dict, want: dict) -> bool:
  """Whether a table whose results.json has settings `made` was evaluated as `want` asks (the same text,
  protocol and package roots) on at least `want`'s tasks; both as `settings_of` gives them."""
  made = {"text_field": "text", **made}  # tables from before text_field read "text"
  but_tasks = lambda s: {k: v for k, v in s.items() if k != "tasks"}
  return but_tasks(made) == but_tasks(want) and set(want["tasks"]) <= set(made["tasks"])


def evaluate_curve(workdir: str, out: Optional[str] = None, text=None, tasks: Sequence[str] = (),
                   protocol: Protocol = DEFAULT_PROTOCOL, finetune_too: bool = False,
                   package_roots: Sequence[str] = (), text_field: str = "text", log=print,
                   teacher: Optional[str] = None) -> dict:
  """Quality against compute: the student of every kept checkpoint on the cheap probes (held-out
  relation loss, retrieval, agreement, package linear probe; fine-tuning with `finetune_too`), beside the
  flat lines of OUT/results.json (run `evaluate_run` first, with the same settings). Writes
  OUT/curve.{json,png}: {step: row} with the tokens seen at each step."""
  from transformers import AutoTokenizer
  from minilm_jax import checkpoint
  out = out or wd.eval_dir(workdir)
  check_out(out, [workdir])
  table = os.path.join(out, "results.json")
  if not os.path.isfile(table):
    raise FileNotFoundError(f"{table}: no results table; evaluate the run without --curve first")
  with open(table) as f:
    flat = json.load(f)
  ft = list(dict.fromkeys(["nsp", "package", *tasks])) if finetune_too else []
  want = settings_of(protocol, text, ft, package_roots, text_field)
  if not made_with(flat["settings"], want):
    raise ValueError(f"{table} was made with other settings ({flat['settings']}): evaluate the curve with "
                     "the same settings, or evaluate the run again")
  cfg, models, teacher_dir = models_of_runs([workdir], baselines=False, teacher=teacher)
  name = student_name(workdir)
  student_config = models[name][0]
  tok = AutoTokenizer.from_pretrained(wd.local_student(workdir))
  b = make_bench(cfg, tok, models["teacher"], teacher_dir, protocol, text, ft, package_roots, text_field)
  mngr = read_run(workdir)[2]
  curve = {}
  for step in mngr.all_steps():
    params = objective.student_params(checkpoint.restore_params(mngr, step))
    row = {"tokens": step * cfg.batch_size * cfg.data.max_len}
    row.update(quality(b, (student_config, params), False, finetune_too, log))
    log(f"step {step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if isinstance(v, dict)))
    curve[step] = row
  hf._write_json(os.path.join(out, "curve.json"), {"workdir": workdir, "settings": want, "curve": curve})
  _curve_plot(curve, flat["results"], name, os.path.join(out, "curve.png"))
  return curve


def _err(m: dict) -> float:
  e = m.get("spread", m.get("se", 0.0))
  return e if e is not None and np.isfinite(e) else 0.0


def _curve_plot(curve: dict, flat: dict, student: str, png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = _metrics(curve)
  steps = sorted(curve)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), dpi=110, squeeze=False)
  for ax, m in zip(axes[0], metrics):
    ax.errorbar(steps, [curve[s][m]["value"] for s in steps], [_err(curve[s][m]) for s in steps],
                fmt="o-", color="black", capsize=3, label=student)
    for i, (name, row) in enumerate((n, r) for n, r in flat.items() if n != student):
      if m in row:
        ax.axhline(row[m]["value"], color=f"C{i}", ls="--", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(LABELS.get(m, m))
    if m == "heldout_relation_loss":
      ax.set_yscale("log")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)


def _bar_chart(results: dict, metrics: Sequence[str], png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results)
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 3, 1 + 0.45 * len(names)),
                           dpi=110, squeeze=False)
  for i, (ax, m) in enumerate(zip(axes[0], metrics)):
    rows = [results[n].get(m, {"value": np.nan}) for n in names]  # a gap where a model has no score
    ax.barh(names, [r["value"] for r in rows], xerr=[_err(r) for r in rows], color="tab:blue", capsize=3)
    ax.set_xlabel(LABELS.get(m, m) + (" (± sd)" if _is_finetune(m) else " (± SE)"), fontsize=8)
    ax.invert_yaxis()
    if i:
      ax.set_yticklabels([])
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)
