"""Text in, token batches out: sources, tokenisation (cached), packing, and a resumable per-host order.

A batch is a dict of int32 numpy arrays `input_ids` [B, T] and `attention_mask` [B, T]. Rows are packed BERT
style: `[CLS] doc_a [SEP] doc_b [SEP] ...` cut every `max_len` tokens, the last row padded. The order is a
pure function of (seed, step): a resumed run sees exactly the batches an uninterrupted one would, and the
checkpoint only needs the step.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import json
import os
import queue
import sysconfig
import threading
import zipfile
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np

STDLIB = "stdlib"
PYDOCS = "pydocs"
_SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def _docstrings(root: str, skip_dirs) -> List[str]:
  """The docstrings over 200 characters of every module, class and function under `root`, read with
  `ast` (nothing is imported)."""
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
    for name in sorted(f for f in filenames if f.endswith(".py")):
      try:
        with open(os.path.join(dirpath, name), encoding="utf-8") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        continue
      for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          doc = ast.get_docstring(node)
          if doc and len(doc) > 200:
            docs.append(doc)
  return docs


def _split(docs: Sequence[str], split: str, name: str) -> Tuple[str, ...]:
  # By content hash, so a document held out of one corpus is held out of every corpus that contains it.
  held = lambda d: int(hashlib.sha1(d.encode()).hexdigest(), 16) % 5 == 0
  if split not in ("train", "heldout"):
    raise ValueError(f"{name} corpus split {split!r}: use 'train' or 'heldout'")
  return tuple(d for d in docs if held(d) == (split == "heldout"))


@functools.lru_cache(maxsize=2)
def stdlib_corpus(split: str = "train") -> Tuple[str, ...]:
  """A small demo corpus every Python installation carries: the language reference topics
  (`pydoc_data.topics`) and the standard library's docstrings longer than 200 characters.

  About 1.7 MB of English technical prose: enough to show distillation working offline, far too small
  and narrow to pretrain a useful student. Every 5th document (by content hash) is held out:
  `split="heldout"` returns those, for evaluation on text the run did not train on.
  """
  import pydoc_data.topics
  docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
  docs += _docstrings(sysconfig.get_paths()["stdlib"], _SKIP_DIRS)
  return _split(docs, split, STDLIB)


@functools.lru_cache(maxsize=2)
def pydocs_corpus(split: str = "train") -> Tuple[str, ...]:
  """The stdlib corpus plus the docstrings of every package installed beside minilm_jax (site-packages),
  deduplicated: about 43 MB (10.4M tokens) with the test extra installed, 26× the stdlib corpus. It
  depends on what is installed, so the token cache is keyed on the documents. Held out the same way,
  so the stdlib corpus's held-out documents are held out here too (the probe and held-out loss use them).
  """
  paths = sysconfig.get_paths()
  docs = list(stdlib_corpus("train") + stdlib_corpus("heldout"))
  for root in dict.fromkeys((paths["purelib"], paths["platlib"])):
    docs += _docstrings(root, {"test", "tests", "__pycache__"})
  return _split(list(dict.fromkeys(docs)), split, PYDOCS)


def _read_file(path: str, text_field: str) -> List[str]:
  if path.endswith(".txt"):
    with open(path, encoding="utf-8") as f:
      # Blank lines separate documents.
      return [d.strip() for d in f.read().split("\n\n") if d.strip()]
  if path.endswith((".jsonl", ".json")):
    docs = []
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        row = json.loads(line)
        if text_field not in row:
          raise ValueError(f"{path}:{lineno}: no text field {text_field!r} (fields: {sorted(row)})")
        docs.append(row[text_field])
    return docs
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    if text_field not in table.column_names:
      raise ValueError(f"{path}: no text field {text_field!r} (columns: {table.column_names})")
    return [d for d in table.column(text_field).to_pylist() if d]
  raise ValueError(f"{path}: unsupported file type; use .txt, .jsonl or .parquet")


def load_texts(source: Union[str, Sequence[str]], text_field: str = "text", hub_config: str = "",
               split: str = "train") -> List[str]:
  """Documents from: "stdlib" (the embedded demo corpus), "pydocs" (stdlib plus every installed
  package's docstrings), an in-memory list of strings, a .txt / .jsonl /
  .parquet file or a folder of them, or a `datasets` hub name (with `hub_config`, e.g. "wikitext",
  "wikitext-103-raw-v1"). Empty documents are dropped; no documents at all is a ValueError."""
  if not isinstance(source, str):
    docs = list(source)
    where = "the in-memory list"
  elif source == STDLIB:
    docs, where = stdlib_corpus(split), "the stdlib corpus"
  elif source == PYDOCS:
    docs, where = pydocs_corpus(split), "the pydocs corpus"
  elif os.path.isdir(source):
    files = sorted(f for ext in ("txt", "jsonl", "json", "parquet")
                   for f in glob.glob(os.path.join(source, "**", f"*.{ext}"), recursive=True))
    docs = [d for f in files for d in _read_file(f, text_field)]
    where = source
  elif os.path.isfile(source):
    docs, where = _read_file(source, text_field), source
  elif source.startswith((".", "/", "~")) or os.sep + os.sep in source:
    raise FileNotFoundError(f"data source {source}: no such file or folder")
  else:
    import datasets
    try:
      ds = datasets.load_dataset(source, hub_config or None, split=split)
    except Exception as e:
      raise ValueError(f"data source {source!r}: not a local file or folder, and `datasets` could not "
                       f"load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if text_field not in ds.column_names:
      raise ValueError(f"data source {source!r}: no text field {text_field!r} (columns: {ds.column_names})")
    docs, where = ds[text_field], source
  docs = [d for d in docs if isinstance(d, str) and d.strip()]
  if not docs:
    raise ValueError(f"data source {where}: no non-empty documents")
  return docs


def _fingerprint(docs: Sequence[str], tokenizer, max_len: int) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([type(tokenizer).__name__, len(tokenizer), tokenizer.cls_token_id,
                       tokenizer.sep_token_id, tokenizer.pad_token_id, max_len]).encode())
  h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
  for d in docs:
    h.update(hashlib.sha256(d.encode()).digest())
  return h.hexdigest()[:16]


def pack(token_lists: Sequence[Sequence[int]], max_len: int, cls_id: int, sep_id: int, pad_id: int):
  """BERT-style packing: [CLS] d1 [SEP] d2 [SEP] ... in rows of max_len; returns (ids, mask) [N, T] int32."""
  if max_len < 2:
    raise ValueError(f"max_len {max_len} is too short: a row needs [CLS] and one token")
  body = max_len - 1
  stream = np.fromiter((t for toks in token_lists for t in (*toks, sep_id)), dtype=np.int32)
  n = -(-len(stream) // body)
  padded = np.full(n * body, pad_id, np.int32)
  padded[:len(stream)] = stream
  ids = np.concatenate([np.full((n, 1), cls_id, np.int32), padded.reshape(n, body)], axis=1)
  mask = np.ones_like(ids)
  mask[-1, 1 + len(stream) - (n - 1) * body:] = 0
  return ids, mask


def tokenize_and_pack(docs: Sequence[str], tokenizer, max_len: int, cache_dir: str = "",
                      progress: bool = False) -> Dict[str, np.ndarray]:
  """Token rows {"input_ids", "attention_mask"} [N, max_len], cached in cache_dir by content hash."""
  path = ""
  if cache_dir:
    path = os.path.join(cache_dir, f"tokens-{_fingerprint(docs, tokenizer, max_len)}.npz")
    if os.path.isfile(path):
      try:
        with np.load(path) as z:
          return {"input_ids": z["input_ids"], "attention_mask": z["attention_mask"]}
      except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # A torn cache file: tokenise again.
  from tqdm.auto import tqdm
  token_lists = []
  chunk = 256
  for i in tqdm(range(0, len(docs), chunk), desc="tokenising", unit="chunk", disable=not progress,
                leave=False):
    enc = tokenizer(list(docs[i:i + chunk]), add_special_tokens=False, return_attention_mask=False,
                    verbose=False)
    token_lists.extend(enc["input_ids"])
  ids, mask = pack(token_lists, max_len, tokenizer.cls_token_id, tokenizer.sep_token_id,
                   tokenizer.pad_token_id)
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"  # hosts sharing the folder write the same bytes
    np.savez(tmp, input_ids=ids, attention_mask=mask)
    os.replace(tmp, path)
  return {"input_ids": ids, "attention_mask": mask}


def batch_rows(step: int, global_batch: int, num_rows: int, seed: int) -> np.ndarray:
  """Row indices [global_batch] of batch `step`: epoch after epoch of seeded permutations."""
  g = step * global_batch + np.arange(global_batch)
  epochs, within = g // num_rows, g % num_rows
  out = np.empty(global_batch, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e)]).permutation(num_rows)
    out[epochs == e] = perm[within[epochs == e]]
  return out


def host_batch(rows: Dict[str, np.ndarray], step: int, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1) -> Dict[str, np.ndarray]:
  """This host's slice of global batch `step` (every host computes the same global order)."""
  if global_batch % process_count:
    raise ValueError(f"batch_size {global_batch} does not divide over {process_count} hosts")
  idx = batch_rows(step, global_batch, len(rows["input_ids"]), seed)
  per = global_batch // process_count
  idx = idx[process_index * per:(process_index + 1) * per]
  return {k: v[idx] for k, v in rows.items()}


def prefetch(make_batch, start_step: int, end_step: int, depth: int = 2) -> Iterator:
  """Yield make_batch(step) for steps in [start, end), built `depth` ahead on a background thread so
  the host prepares the next batch while the accelerator runs the current step."""
  q: "queue.Queue" = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item):
    while not stop.is_set():  # never block forever on a consumer that has gone away
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def worker():
    try:
      for step in range(start_step, end_step):
        if not put((step, make_batch(step))):
          return
    except BaseException as e:  # Hand errors to the consumer rather than dying silently.
      put((None, e))
      return
    put((None, None))

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      step, item = q.get()
      if step is None:
        if item is not None:
          raise item
        return
      yield step, item
  finally:
    stop.set()
    # Wait for the worker (at most one batch and 0.1 s): a daemon thread still inside numpy when the
    # interpreter exits is killed there, which aborts the process (seen after a SIGTERM stop).
    thread.join()


def package_docstrings(roots: Sequence[str] = (), split: str = "heldout") -> Dict[str, List[str]]:
  """{top-level package: its docstrings} of the packages installed in `roots` (default: this Python's
  site-packages, purelib and platlib), read with `ast` as `pydocs_corpus` reads them, and only those of
  `split` by the same content-hash rule: a run trained on the pydocs train split never saw the held-out
  ones. A docstring found in two packages (vendored copies) is dropped: its label would be ambiguous, and
  the same text could land in two splits of a task."""
  if not roots:
    paths = sysconfig.get_paths()
    roots = tuple(dict.fromkeys((paths["purelib"], paths["platlib"])))
  found: Dict[str, List[str]] = {}
  for root in roots:
    for name in sorted(os.listdir(root)):
      folder = os.path.join(root, name)
      if name.isidentifier() and name != "__pycache__" and os.path.isdir(folder):
        found.setdefault(name, []).extend(_docstrings(folder, {"test", "tests", "__pycache__"}))
  owners: Dict[str, set] = {}
  for pkg, docs in found.items():
    for d in docs:
      owners.setdefault(d, set()).add(pkg)
  out = {}
  for pkg, docs in found.items():
    kept = _split([d for d in dict.fromkeys(docs) if len(owners[d]) == 1], split, f"packages in {roots}")
    if kept:
      out[pkg] = list(kept)
  return out
