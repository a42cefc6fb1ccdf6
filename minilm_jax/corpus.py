"""Text sources, read as pieces: whole documents that any process can read on its own, in order.

A source is "stdlib" (the demo corpus), "pydocs" (stdlib plus every installed package's docstrings), an
in-memory list of strings, a .txt / .jsonl / .parquet file or a folder of them (local or gs://), or a
`datasets` hub name (streamed). `pieces(source)` cuts it into pieces of about `piece_bytes` of text
without reading it all: a .txt file at blank lines, a .jsonl file at line ends, a .parquet file at row
groups, a hub dataset at its data files. `read_piece` streams one piece's documents. Reading every piece
in order gives exactly `load_texts(source)`, so tokenising the pieces in parallel (shards.py) sees the
corpus a single reader would, in the same order, in constant memory.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import re
import sysconfig
from typing import Dict, Iterator, List, Sequence, Tuple, Union

STDLIB = "stdlib"
PYDOCS = "pydocs"
PIECE_BYTES = 32 << 20  # ~8M tokens of English: a shard, and a unit of parallel work
_FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet")
_SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


# --- The embedded corpora ------------------------------------------------------------------------------

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
  depends on what is installed, so the token shards are keyed on the documents. Held out the same way,
  so the stdlib corpus's held-out documents are held out here too (the probe and held-out loss use them).
  """
  paths = sysconfig.get_paths()
  docs = list(stdlib_corpus("train") + stdlib_corpus("heldout"))
  for root in dict.fromkeys((paths["purelib"], paths["platlib"])):
    docs += _docstrings(root, {"test", "tests", "__pycache__"})
  return _split(list(dict.fromkeys(docs)), split, PYDOCS)


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


# --- Pieces --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Piece:
  """Whole documents of a source that one process reads on its own (picklable, small).

  kind "docs": `docs` themselves; "txt"/"jsonl": bytes [start, end) of file `path`; "parquet": row groups
  [start, end) of `path`; "hub": data-file shard `start` of `num_shards` of hub dataset `path`.
  """
  kind: str
  path: str = ""
  start: int = 0
  end: int = 0
  docs: Tuple[str, ...] = ()
  text_field: str = "text"
  hub_config: str = ""
  split: str = "train"
  num_shards: int = 0


def _path(p: str):
  from etils import epath
  return epath.Path(p)


def _is_remote(p: str) -> bool:
  return "://" in p


def _files(source: str) -> List[str]:
  """The source files of a file or folder (recursively, sorted by path), local or gs://."""
  p = _path(source)
  if p.is_dir():
    def walk(d):  # epath has no recursive glob for gs://
      for f in d.iterdir():
        if f.is_dir():
          yield from walk(f)
        elif f.name.endswith(_FILE_TYPES):
          yield str(f)
    return sorted(walk(p))
  if p.is_file():
    if not source.endswith(_FILE_TYPES):
      raise ValueError(f"{source}: unsupported file type; use .txt, .jsonl or .parquet")
    return [str(p)]
  raise FileNotFoundError(f"data source {source}: no such file or folder")


def _looks_like_a_path(source: str) -> bool:
  return _is_remote(source) or source.startswith((".", "/", "~")) or os.path.exists(source) \
      or os.sep + os.sep in source


def _cut_points(path: str, size: int, piece_bytes: int, at_blank_line: bool) -> List[int]:
  """Byte offsets that start a piece: about every piece_bytes, moved forward to the next line start (or,
  for .txt, to just after the next blank line, so no document is cut)."""
  cuts = [0]
  with _path(path).open("rb") as f:
    for nominal in range(piece_bytes, size, piece_bytes):
      if nominal <= cuts[-1]:
        continue
      f.seek(nominal)
      f.readline()  # the rest of the line we landed in
      if at_blank_line:
        while True:
          line = f.readline()
          if not line or not line.strip():
            break
      pos = f.tell()
      if pos < size and pos > cuts[-1]:
        cuts.append(pos)
  return cuts + [size]


def _parquet_pieces(path: str, text_field: str, piece_bytes: int) -> List[Piece]:
  import pyarrow.parquet as pq
  with _path(path).open("rb") as f:
    meta = pq.ParquetFile(f).metadata
    names = meta.schema.names
    if text_field not in names:
      raise ValueError(f"{path}: no text field {text_field!r} (columns: {names})")
    out, start, acc = [], 0, 0
    for g in range(meta.num_row_groups):
      acc += meta.row_group(g).total_byte_size
      if acc >= piece_bytes or g == meta.num_row_groups - 1:
        out.append(Piece("parquet", path, start, g + 1, text_field=text_field))
        start, acc = g + 1, 0
  return out


def _hub_dataset(piece: Piece):
  import datasets
  try:
    return datasets.load_dataset(piece.path, piece.hub_config or None, split=piece.split, streaming=True)
  except Exception as e:  # the hub's errors are of many types; the user needs one line
    raise ValueError(f"data source {piece.path!r}: not a local file or folder, and `datasets` could not "
                     f"load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def pieces(source: Union[str, Sequence[str]], text_field: str = "text", hub_config: str = "",
           split: str = "train", piece_bytes: int = PIECE_BYTES) -> List[Piece]:
  """The source cut into pieces of about piece_bytes of text, in corpus order (see the module doc)."""
  if not isinstance(source, str) or source in (STDLIB, PYDOCS):
    if isinstance(source, str):
      docs = stdlib_corpus(split) if source == STDLIB else pydocs_corpus(split)
    else:
      docs = tuple(d for d in source if isinstance(d, str))
    out, start, acc = [], 0, 0
    for i, d in enumerate(docs):
      acc += len(d)
      if acc >= piece_bytes or i == len(docs) - 1:
        out.append(Piece("docs", docs=tuple(docs[start:i + 1])))
        start, acc = i + 1, 0
    return out
  if _looks_like_a_path(source):
    out = []
    for f in _files(source):
      if f.endswith(".parquet"):
        out += _parquet_pieces(f, text_field, piece_bytes)
        continue
      kind = "txt" if f.endswith(".txt") else "jsonl"
      cuts = _cut_points(f, _path(f).stat().length, piece_bytes, kind == "txt")
      out += [Piece(kind, f, a, b, text_field=text_field) for a, b in zip(cuts, cuts[1:])]
    return out
  hub = Piece("hub", source, text_field=text_field, hub_config=hub_config, split=split)
  n = max(1, _hub_dataset(hub).num_shards)
  return [dataclasses.replace(hub, start=i, num_shards=n) for i in range(n)]


def _lines(path: str, start: int, end: int) -> Iterator[Tuple[int, str]]:
  """(byte offset, decoded line) of the lines starting in [start, end)."""
  with _path(path).open("rb") as f:
    f.seek(start)
    pos = start
    while pos < end:
      raw = f.readline()
      if not raw:
        return
      if pos == 0 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a byte-order mark (Windows editors write one) is not text
        pos = 3
      try:
        yield pos, raw.decode("utf-8")
      except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (near byte {pos})") from None
      pos += len(raw)


def read_piece(piece: Piece) -> Iterator[str]:
  """The piece's non-empty documents, in order, streamed (a piece is never held whole as text)."""
  if piece.kind == "docs":
    docs = piece.docs
  elif piece.kind == "txt":
    docs = _txt_docs(piece)
  elif piece.kind == "jsonl":
    docs = _jsonl_docs(piece)
  elif piece.kind == "parquet":
    docs = _parquet_docs(piece)
  elif piece.kind == "hub":
    docs = _hub_docs(piece)
  else:
    raise ValueError(f"unknown piece kind {piece.kind!r}")
  for d in docs:
    if isinstance(d, str) and d.strip():
      yield d


def _txt_docs(piece: Piece) -> Iterator[str]:
  doc: List[str] = []
  for _, line in _lines(piece.path, piece.start, piece.end):
    if line.strip():
      doc.append(line.replace("\r\n", "\n"))  # as a text-mode read would
    elif doc:  # a blank line ends a document
      yield "".join(doc).strip()
      doc = []
  if doc:
    yield "".join(doc).strip()


def _jsonl_docs(piece: Piece) -> Iterator[str]:
  for pos, line in _lines(piece.path, piece.start, piece.end):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as e:
      raise ValueError(f"{piece.path}: not JSON Lines (near byte {pos}: {e})") from None
    if not isinstance(row, dict) or piece.text_field not in row:
      fields = sorted(row) if isinstance(row, dict) else type(row).__name__
      raise ValueError(f"{piece.path} (near byte {pos}): no text field {piece.text_field!r} "
                       f"(fields: {fields})")
    yield row[piece.text_field]


def _parquet_docs(piece: Piece) -> Iterator[str]:
  import pyarrow.parquet as pq
  with _path(piece.path).open("rb") as f:
    pf = pq.ParquetFile(f)
    for batch in pf.iter_batches(batch_size=4096, row_groups=list(range(piece.start, piece.end)),
                                 columns=[piece.text_field]):
      yield from batch.column(0).to_pylist()


def _hub_docs(piece: Piece) -> Iterator[str]:
  ds = _hub_dataset(piece).shard(num_shards=piece.num_shards, index=piece.start)
  for row in ds:
    if piece.text_field not in row:
      raise ValueError(f"data source {piece.path!r}: no text field {piece.text_field!r} "
                       f"(columns: {sorted(row)})")
    yield row[piece.text_field]


def load_texts(source: Union[str, Sequence[str]], text_field: str = "text", hub_config: str = "",
               split: str = "train") -> List[str]:
  """All documents of a source in memory, for small inputs (evaluation text, tests); training streams
  them through shards.py instead. Empty documents are dropped; none at all is a ValueError."""
  docs = [d for p in pieces(source, text_field, hub_config, split) for d in read_piece(p)]
  if not docs:
    where = source if isinstance(source, str) else "the in-memory list"
    raise ValueError(f"data source {where}: no non-empty documents")
  return docs


# --- Sentences and held-out text -----------------------------------------------------------------------

# Scripts written without spaces between words (Han, kana, Thai): their sentences end at a full-width
# stop with no space after it, and their length is counted in characters, since split() sees one word.
_UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])(?![」』）”’\"'])\s*")


def sentences(doc: str) -> List[str]:
  """The sentences of `doc` with at least 4 words (8 characters of a script without spaces). A sentence
  ends at . ! ? followed by whitespace, or at 。！？ not followed by a closing quote (a stop inside a
  quotation does not end the sentence that quotes it)."""
  parts = (s.strip() for s in _SENTENCE_END.split(doc.replace("\n", " ")))
  return [s for s in parts if len(s.split()) >= 4 or len(re.findall(f"[{_UNSPACED}]", s)) >= 8]


def heldout_docs(text=None, text_field: str = "text") -> List[str]:
  """Evaluation's text: the stdlib corpus's held-out split, or all of `text` (any load_texts source;
  `text_field` names the text of a .jsonl/.parquet one)."""
  return load_texts(STDLIB, split="heldout") if text is None else load_texts(text, text_field)


# --- Identity ------------------------------------------------------------------------------------------

def _sampled_hash(path: str, size: int, blocks: int = 16, block: int = 1 << 16) -> str:
  """SHA-256 of `blocks` evenly spaced 64 KB blocks (first and last included): a file's identity that
  every host computes alike, in milliseconds, without reading a multi-GB file whole."""
  h = hashlib.sha256()
  with _path(path).open("rb") as f:
    offsets = sorted({min(max(0, size - block), i * max(0, size - block) // max(1, blocks - 1))
                      for i in range(blocks)})
    for o in offsets:
      f.seek(o)
      h.update(f.read(block))
  return h.hexdigest()


def source_identity(source: Union[str, Sequence[str]], parts: Sequence[Piece]) -> str:
  """A key for the text the pieces hold, the same on every host: each piece's place (files by their name
  relative to the source, with their size and sampled content), the documents themselves when they are in
  memory, and a hub dataset's resolved data files."""
  root = str(_path(source)).rstrip("/") if isinstance(source, str) and _looks_like_a_path(source) else ""
  rel = lambda f: f[len(root):].lstrip("/") if root and f.startswith(root) else os.path.basename(f)
  h = hashlib.sha256()
  for p in parts:
    h.update(json.dumps([p.kind, rel(p.path) if p.kind in ("txt", "jsonl", "parquet") else p.path,
                         p.start, p.end, p.text_field, p.hub_config, p.split, p.num_shards]).encode())
    for d in p.docs:
      h.update(hashlib.sha256(d.encode()).digest())
  for f in dict.fromkeys(p.path for p in parts if p.kind in ("txt", "jsonl", "parquet")):
    size = _path(f).stat().length
    h.update(json.dumps([rel(f), size, _sampled_hash(f, size)]).encode())
  if parts and parts[0].kind == "hub":
    import datasets
    try:
      builder = datasets.load_dataset_builder(parts[0].path, parts[0].hub_config or None)
      files = builder.config.data_files
      h.update(json.dumps([builder.hash, str(files.get(parts[0].split) if files else None)]).encode())
    except Exception as e:  # as in _hub_dataset: one line for whatever the hub raised
      raise ValueError(f"data source {parts[0].path!r}: `datasets` could not describe it "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  return h.hexdigest()[:16]
