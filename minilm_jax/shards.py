"""Token shards: a corpus tokenised once, in parallel, into Arrow files that training reads rows from.

  CACHE/<fingerprint>/shard-00000.arrow ...  one per piece of the corpus (corpus.py), packed BERT style
  CACHE/<fingerprint>/manifest.json          written last: the shards, their rows, documents and tokens

The fingerprint covers the corpus (corpus.source_identity), the tokenizer and max_len, so every run and
every host with the same inputs reuses the same shards, and any change makes new ones. CACHE is local or
gs://. Each shard is written whole and then appears atomically (a local rename; a GCS object appears when
closed), so a killed preparation leaves only finished shards, and rerunning it makes only the missing ones:
the result is byte for byte that of an uninterrupted run.

A shard is an Arrow IPC stream (the format Hugging Face `datasets` keeps its tables in:
`datasets.Dataset.from_file` opens one) with two columns: `input_ids`, fixed-size lists of max_len
token ids (uint16 when the vocabulary fits, else int32), and `length`, the real tokens of each row (only a
shard's last row is padded). `Rows` memory-maps them: a batch reads its rows by index, and nothing the size
of the corpus is ever held in memory. A gs:// cache is first copied, shard by shard, to a local disk cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from minilm_jax import corpus, data

FORMAT = 1
MANIFEST = "manifest.json"
_META = b"minilm_jax"


@dataclasses.dataclass
class Hosts:
  """The hosts of a multi-host run, for splitting the work: this one's index, their count, a barrier and
  an all-gather of one int per host (sharding.hosts builds it from jax.distributed)."""
  index: int
  count: int
  barrier: Callable[[str], None]
  gather: Callable[[int], List[int]]


def fingerprint(source_key: str, tokenizer, max_len: int) -> str:
  """The shard folder's name: the corpus, the tokenizer (class, size, special ids, vocabulary) and max_len."""
  h = hashlib.sha256(json.dumps([FORMAT, source_key, type(tokenizer).__name__, len(tokenizer),
                                 tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                                 max_len]).encode())
  h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
  return h.hexdigest()[:16]


def _path(p: str):
  from etils import epath
  return epath.Path(p)


def _join(folder: str, name: str) -> str:
  return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)


def shard_name(i: int) -> str:
  return f"shard-{i:05d}.arrow"


# --- Writing -------------------------------------------------------------------------------------------

def _write(path: str, ids: np.ndarray, lengths: np.ndarray, info: dict) -> None:
  """One shard, atomically: written to a local temporary file, then renamed (or copied up to gs://)."""
  import pyarrow as pa
  t = ids.shape[1]
  schema = pa.schema([pa.field("input_ids", pa.list_(pa.from_numpy_dtype(ids.dtype), t)),
                      pa.field("length", pa.int32())], metadata={_META: json.dumps(info)})
  batch = pa.record_batch([pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), t),
                           pa.array(lengths)], schema=schema)
  remote = "://" in path
  tmp = (f"{path}.tmp-{os.getpid()}" if not remote else
         os.path.join(_local_tmp(), f"{hashlib.sha1(path.encode()).hexdigest()[:12]}-{os.getpid()}"))
  with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
    w.write_batch(batch)
  if remote:
    _path(tmp).copy(_path(path), overwrite=True)
    os.remove(tmp)
  else:
    os.replace(tmp, path)


def _local_tmp() -> str:
  d = os.path.join(os.path.expanduser("~"), ".cache", "minilm_jax", "tmp")
  os.makedirs(d, exist_ok=True)
  return d


_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
  # One core per process: the processes are the parallelism (num_proc), not the tokenizer's threads.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  global _TOKENIZER
  from transformers import AutoTokenizer
  _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


def _make_shard(task, tok=None) -> dict:
  """Tokenise and pack one piece into its shard (with the worker's tokenizer unless given); returns its
  info (also kept in the shard)."""
  piece, max_len, dtype, path = task
  tok, n_docs = tok or _TOKENIZER, 0

  def docs():
    nonlocal n_docs
    for d in corpus.read_piece(piece):
      n_docs += 1
      yield d

  stream = data.token_stream(docs(), tok, np.dtype(dtype))
  ids, lengths = data.pack_stream(stream, max_len, tok.cls_token_id, tok.pad_token_id)
  info = {"format": FORMAT, "rows": len(ids), "docs": n_docs, "tokens": int(len(stream))}
  _write(path, ids, lengths.astype(np.int32), info)
  return info


def _read_info(path: str) -> dict:
  import pyarrow as pa
  with _path(path).open("rb") as f:
    return json.loads(pa.ipc.open_stream(f).schema.metadata[_META])


def _shared(folder: str, hosts: Hosts) -> bool:
  """Whether every host sees the same cache folder (gs://, or a shared disk): then they split the work;
  otherwise each makes every shard in its own."""
  probe = _path(_join(folder, ".hosts-probe"))
  if hosts.index == 0:
    probe.write_text(str(random.SystemRandom().randrange(1 << 30)))
  hosts.barrier("minilm_jax_shards_probe")
  mine = int(probe.read_text()) if probe.exists() else -1
  seen = hosts.gather(mine)
  hosts.barrier("minilm_jax_shards_probed")
  return seen[0] >= 0 and all(s == seen[0] for s in seen)


def _make_missing(parts, folder: str, tokenizer_dir: str, tok, max_len: int, dtype: str, num_proc: int,
                  progress: bool, mine: Sequence[int]) -> dict:
  """Make the shards of pieces `mine` that are not there yet, in num_proc processes (0: one per core).
  Returns what was done: shards, tokens, seconds, processes."""
  for name in _path(folder).iterdir():  # our own torn temporaries from a killed run
    if ".tmp-" in name.name and any(name.name.startswith(shard_name(i)) for i in mine):
      name.unlink()
  tasks = [(parts[i], max_len, dtype, _join(folder, shard_name(i))) for i in mine
           if not _path(_join(folder, shard_name(i))).exists()]
  procs = min(len(tasks), num_proc or len(os.sched_getaffinity(0)))
  from tqdm.auto import tqdm
  t0, tokens = time.time(), 0
  with tqdm(total=len(mine), initial=len(mine) - len(tasks), desc="tokenising", unit="shard",
            disable=not progress, leave=False) as bar:
    if procs > 1:
      with multiprocessing.get_context("spawn").Pool(procs, _init_worker, (tokenizer_dir,)) as pool:
        for info in pool.imap_unordered(_make_shard, tasks):
          tokens += info["tokens"]
          bar.set_postfix(tok_s=f"{tokens / (time.time() - t0):.0f}")
          bar.update(1)
    else:
      for task in tasks:
        tokens += _make_shard(task, tok)["tokens"]
        bar.update(1)
  return {"shards": len(tasks), "tokens": tokens, "secs": time.time() - t0, "procs": procs}


def _write_manifest(folder: str, n: int, max_len: int, dtype: str) -> Optional[dict]:
  """manifest.json from the shards' own records, written last (atomically); None if no documents."""
  infos = [_read_info(_join(folder, shard_name(i))) for i in range(n)]
  if not sum(i["docs"] for i in infos):
    return None
  m = {"format": FORMAT, "max_len": max_len, "dtype": dtype,
       "shards": [{"name": shard_name(i), **info} for i, info in enumerate(infos)],
       **{k: sum(i[k] for i in infos) for k in ("rows", "docs", "tokens")}}
  tmp = _path(_join(folder, f".{MANIFEST}.tmp-{os.getpid()}"))
  tmp.write_text(json.dumps(m, indent=1))
  tmp.rename(_path(_join(folder, MANIFEST)))
  return m


def prepare(source, tokenizer_dir: str, max_len: int, cache_dir: str, *, text_field: str = "text",
            hub_config: str = "", split: str = "train", num_proc: int = 0, progress: bool = False,
            hosts: Optional[Hosts] = None, piece_bytes: int = corpus.PIECE_BYTES,
            log: Callable[[str], None] = print) -> str:
  """Tokenise and pack `source` into shards under cache_dir, unless they are there already; returns the
  shard folder (for `Rows`). num_proc processes (0: one per core) tokenise the pieces; hosts that share
  the cache folder each make their share (piece i on host i mod hosts), and all wait for the whole."""
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  parts = corpus.pieces(source, text_field, hub_config, split, piece_bytes)
  empty = ValueError(f"data source {source if isinstance(source, str) else 'the in-memory list'}: no "
                     "non-empty documents")
  if not parts:
    raise empty
  folder = _join(cache_dir, fingerprint(corpus.source_identity(source, parts), tok, max_len))
  manifest = _path(_join(folder, MANIFEST))
  if manifest.exists():
    return folder
  created = [p for p in (cache_dir, folder) if not _path(p).exists()]
  _path(folder).mkdir(parents=True, exist_ok=True)
  shared = hosts is not None and _shared(folder, hosts)
  mine = [i for i in range(len(parts)) if not shared or i % hosts.count == hosts.index]
  dtype = "uint16" if len(tok) <= 1 << 16 else "int32"
  try:
    made = _make_missing(parts, folder, tokenizer_dir, tok, max_len, dtype, num_proc, progress, mine)
  except ValueError:  # bad input (a missing text field, say): leave the cache as it was
    if created:
      _remove(created[0])
    raise
  if made["shards"]:
    log(f"made {made['shards']} of {len(parts)} token shards: {made['tokens']:,} tokens in "
        f"{made['secs']:.0f} s, {made['procs']} process(es) on this host, "
        f"{made['tokens'] / max(made['secs'], 1e-9):,.0f} tokens/s")
  if hosts:
    hosts.barrier("minilm_jax_shards_made")
  if not shared or hosts.index == 0:
    m = _write_manifest(folder, len(parts), max_len, dtype)
    if m is None:
      _remove(created[0] if created else folder)
    else:
      log(f"token shards in {folder}: {m['docs']:,} documents, {m['tokens']:,} tokens, {m['rows']:,} "
          f"rows of {max_len}")
  if hosts:  # every host reaches this before any raises: none is left waiting at a barrier
    hosts.barrier("minilm_jax_shards_listed")
  if not manifest.exists():
    raise empty
  return folder


def _remove(folder: str) -> None:
  """Undo a preparation that failed or found no documents: the folder it made, and what is in it."""
  _path(folder).rmtree()


# --- Reading -------------------------------------------------------------------------------------------

def _local_copy(folder: str) -> str:
  """A remote shard folder copied to the local disk cache (only what is missing), for memory-mapping."""
  from minilm_jax import hf
  dst = hf.cache_dir("shards", folder)
  os.makedirs(dst, exist_ok=True)
  m = json.loads(_path(_join(folder, MANIFEST)).read_text())
  for s in m["shards"]:
    target = os.path.join(dst, s["name"])
    if not os.path.exists(target):
      tmp = f"{target}.tmp-{os.getpid()}"
      _path(_join(folder, s["name"])).copy(_path(tmp), overwrite=True)
      os.replace(tmp, target)
  with open(os.path.join(dst, MANIFEST), "w") as f:
    json.dump(m, f)
  return dst


def _one_chunk(column):
  """A shard's column as one Arrow array: ours hold one record batch (see _write), a view of the file."""
  return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class Rows:
  """The packed rows of a shard folder, memory-mapped. len(rows); rows.take(idx) -> {"input_ids",
  "attention_mask"}, int32 [len(idx), max_len]."""

  def __init__(self, folder: str):
    import pyarrow as pa
    local = _local_copy(folder) if "://" in folder else folder
    with open(os.path.join(local, MANIFEST)) as f:
      self.manifest = json.load(f)
    self.max_len = self.manifest["max_len"]
    self._ids, self._lengths = [], []
    for s in self.manifest["shards"]:
      if not s["rows"]:
        continue
      table = pa.ipc.open_stream(pa.memory_map(os.path.join(local, s["name"]))).read_all()
      # Views of the mapped file, never copies: combine_chunks copies even one chunk, and a run over a
      # 1 GB corpus then held all its token ids in memory (+667 MB peak against the demo corpus).
      ids = _one_chunk(table.column("input_ids")).flatten()
      self._ids.append(ids.to_numpy().reshape(-1, self.max_len))
      self._lengths.append(_one_chunk(table.column("length")).to_numpy())
    self.offsets = np.cumsum([0] + [len(x) for x in self._ids])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def take(self, idx: Sequence[int]) -> dict:
    idx = np.asarray(idx, np.int64)
    shard = np.searchsorted(self.offsets, idx, side="right") - 1
    ids = np.empty((len(idx), self.max_len), np.int32)
    lengths = np.empty(len(idx), np.int32)
    for s in np.unique(shard):
      at = shard == s
      ids[at] = self._ids[s][idx[at] - self.offsets[s]]
      lengths[at] = self._lengths[s][idx[at] - self.offsets[s]]
    return {"input_ids": ids, "attention_mask": data.mask_of(lengths, self.max_len)}
