"""Token shards: a corpus tokenised once, in parallel, into Arrow files that training reads rows from.

  CACHE/<fingerprint>/shard-00000.arrow ...  one per piece of the corpus (corpus.py), packed BERT style
  CACHE/<fingerprint>/manifest.json          written last: the shards, their rows, documents, tokens,
                                             bytes and CRC-32

The fingerprint covers the corpus (corpus.source_identity), the tokenizer and max_len, so every run and
every host with the same inputs reuses the same shards, and any change makes new ones. CACHE is local or
gs://. Each shard is written whole and then appears atomically (a local rename; a GCS object appears when
closed), so a killed preparation leaves only finished shards, and rerunning it makes only the missing ones:
the result is byte for byte that of an uninterrupted run. The tokenising processes die with the one that
started them, however it dies.

Nothing damaged is read silently. `prepare` checks a finished folder against its manifest on every run
(each shard's size, and for a local folder its CRC-32) and makes again, with a line saying so, a shard
that is missing or differs and the list of a manifest that does not parse; shards found without a
manifest (a killed preparation's) must read to their last row. `Rows` checks every size, and the
checksum of each shard it copies from gs://; what it finds wrong it refuses (DamagedCache), naming the
file to delete. A manifest from before the sizes and checksums is kept: the next `prepare` reads its
shards through and lists them again, with the line saying so.

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
import signal
import time
import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from minilm_jax import corpus, data

FORMAT = 1
MANIFEST = "manifest.json"
_META = b"minilm_jax"
_FIELDS = ("format", "max_len", "dtype", "shards", "rows", "docs", "tokens")
_SHARD_FIELDS = ("name", "rows", "docs", "tokens")


class DamagedCache(RuntimeError):
  """A token shard or manifest is not what was written, where it is read rather than made again."""


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


def _init_worker(tokenizer_dir: str, parent: int) -> None:
  # Ctrl-C reaches every process of the terminal's group: the parent alone answers it, by stopping the
  # pool (leaving the `with` block terminates it), and the workers print nothing.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _die_with(parent)
  # One core per process: the processes are the parallelism (num_proc), not the tokenizer's threads.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  global _TOKENIZER
  from transformers import AutoTokenizer
  _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


def _die_with(parent: int) -> None:
  """Have the kernel kill this worker when the process that started it dies, even by SIGKILL or an
  unhandled SIGTERM, which leave the pool no chance to stop it (its workers would then tokenise on, and
  wait forever). Linux only (prctl); elsewhere the pool's own teardown is all there is."""
  try:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
      return
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # it died before the prctl: no signal will come
    os._exit(1)


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


# --- Checking -------------------------------------------------------------------------------------------

def _checksum(path: str) -> dict:
  """{"bytes", "crc32"} of a file, read in 16 MB blocks. CRC-32 rather than a cryptographic hash: it is
  there against torn and damaged files, not tampering, and zlib's runs at 4.5 GB/s on this machine (a
  100 MB file from the page cache in 22 ms; SHA-256 66 ms, BLAKE2b 90 ms), cheap enough to check every
  local shard on every run."""
  crc, size = 0, 0
  with _path(path).open("rb") as f:
    while block := f.read(1 << 24):
      crc, size = zlib.crc32(block, crc), size + len(block)
  return {"bytes": size, "crc32": f"{crc:08x}"}


def _read_manifest(folder: str) -> Tuple[Optional[dict], Optional[str]]:
  """(manifest, None); (None, None) where there is none; (None, what is wrong) where it does not parse or
  lacks a field."""
  try:
    text = _path(_join(folder, MANIFEST)).read_text()
  except FileNotFoundError:
    return None, None
  try:
    m = json.loads(text)
  except ValueError:
    return None, "is not valid JSON"
  if not isinstance(m, dict):
    return None, "is not a JSON object"
  missing = [k for k in _FIELDS if k not in m]
  if not missing and not isinstance(m["shards"], list):
    missing = ["shards"]
  if not missing:
    missing = [f"shards[{i}].{k}" for i, s in enumerate(m["shards"]) for k in _SHARD_FIELDS
               if not isinstance(s, dict) or k not in s]
  return (None, f"lacks {missing[0]}") if missing else (m, None)


def _damage(path: str, entry: dict, checksum: bool) -> Optional[str]:
  """What is wrong with the shard at `path` against its manifest entry (missing, another size, with
  `checksum` another CRC-32), or None. An entry from before the sizes and checksums has nothing to
  check."""
  try:
    size = _path(path).stat().length
  except FileNotFoundError:
    return "is missing"
  if "bytes" in entry and size != entry["bytes"]:
    return f"is {size:,} bytes where the manifest says {entry['bytes']:,}"
  if checksum and "crc32" in entry and _checksum(path)["crc32"] != entry["crc32"]:
    return "does not match its CRC-32 in the manifest"
  return None


def _unreadable(path: str) -> Optional[str]:
  """Why a shard found without a manifest (a killed preparation's) cannot be used, or None: its Arrow
  stream must read to the end, with the rows its own record says."""
  import pyarrow as pa
  try:
    with _path(path).open("rb") as f:
      reader = pa.ipc.open_stream(f)
      want = json.loads(reader.schema.metadata[_META])["rows"]
      rows = reader.read_all().num_rows
  except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as e:
    return f"is unreadable ({type(e).__name__})"
  return None if rows == want else f"holds {rows} rows where its record says {want}"


def _refuse(path: str, why: str) -> DamagedCache:
  return DamagedCache(f"{path} {why}: delete it, and minilm-prepare (or the next run) makes it again")


def _intact(folder: str, n: int, hosts: Optional[Hosts], log: Callable[[str], None]) -> bool:
  """Whether `folder` holds a finished preparation of `n` shards, all as its manifest records (for a
  local folder, their checksums too; a gs:// shard's is checked on its local copy, by Rows). Otherwise
  what is damaged goes, each with a line, for prepare to make it again: the shards that differ, and the
  manifest. Hosts agree first, so all of them prepare again or none does: hosts whose caches are not
  shared can differ (one made its shards in an earlier run, another's disk is new), and a host that went
  on to prepare alone would wait at a barrier that the others never reach."""
  m, problem = _read_manifest(folder)
  missing = m is None and problem is None  # not made yet, or a killed preparation: prepare makes the rest
  if problem is None and not missing and len(m["shards"]) != n:
    problem = f"lists {len(m['shards'])} shards where the corpus has {n} pieces"
  damaged = []
  if problem is not None:
    log(f"token shards in {folder}: {MANIFEST} {problem}; listing them again")
  elif not missing:
    for s in m["shards"]:
      why = _damage(_join(folder, s["name"]), s, checksum="://" not in folder)
      if why:
        log(f"token shard {_join(folder, s['name'])} {why}: making it again")
        damaged.append(s["name"])
  old = m is not None and problem is None and not damaged and any("crc32" not in s for s in m["shards"])
  if old:
    log(f"token shards in {folder}: listed by an earlier minilm_jax, without sizes and checksums; reading "
        "them through and listing them again")
  redo = bool(missing or problem or damaged or old)
  if hosts is not None:
    redo = any(hosts.gather(int(redo)))
  if not redo:
    return True
  for name in damaged:
    _path(_join(folder, name)).unlink(missing_ok=True)
  _path(_join(folder, MANIFEST)).unlink(missing_ok=True)
  if hosts is not None:
    hosts.barrier("minilm_jax_shards_checked")  # nobody makes a shard that another still removes
  return False


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
                  progress: bool, mine: Sequence[int], log: Callable[[str], None] = print) -> dict:
  """Make the shards of pieces `mine` that are not there yet (or do not read through), in num_proc
  processes (0: one per core). Returns what was done: shards, tokens, seconds, processes."""
  for name in _path(folder).iterdir():  # our own torn temporaries from a killed run
    if ".tmp-" in name.name and any(name.name.startswith(shard_name(i)) for i in mine):
      name.unlink()
  tasks = []
  for i in mine:
    path = _join(folder, shard_name(i))
    if _path(path).exists():
      why = _unreadable(path)
      if why is None:
        continue
      log(f"token shard {path} {why}: making it again")
      _path(path).unlink()
    tasks.append((parts[i], max_len, dtype, path))
  procs = min(len(tasks), num_proc or len(os.sched_getaffinity(0)))
  from tqdm.auto import tqdm
  t0, tokens = time.time(), 0
  with tqdm(total=len(mine), initial=len(mine) - len(tasks), desc="tokenising", unit="shard",
            disable=not progress, leave=False) as bar:
    if procs > 1:
      # Leaving the block (an error, Ctrl-C) terminates the workers; a parent killed outright takes them
      # with it (_die_with).
      with multiprocessing.get_context("spawn").Pool(procs, _init_worker,
                                                     (tokenizer_dir, os.getpid())) as pool:
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
  """manifest.json from the shards' own records and their sizes and checksums, written last
  (atomically); None if no documents."""
  infos = [_read_info(_join(folder, shard_name(i))) for i in range(n)]
  if not sum(i["docs"] for i in infos):
    return None
  m = {"format": FORMAT, "max_len": max_len, "dtype": dtype,
       "shards": [{"name": shard_name(i), **info, **_checksum(_join(folder, shard_name(i)))}
                  for i, info in enumerate(infos)],
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
  if _intact(folder, len(parts), hosts, log):
    return folder
  created = [p for p in (cache_dir, folder) if not _path(p).exists()]
  _path(folder).mkdir(parents=True, exist_ok=True)
  shared = hosts is not None and _shared(folder, hosts)
  mine = [i for i in range(len(parts)) if not shared or i % hosts.count == hosts.index]
  dtype = "uint16" if len(tok) <= 1 << 16 else "int32"
  try:
    made = _make_missing(parts, folder, tokenizer_dir, tok, max_len, dtype, num_proc, progress, mine, log)
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

def _manifest(folder: str) -> dict:
  """The folder's manifest; FileNotFoundError where there is none (an unfinished preparation),
  DamagedCache where it does not parse."""
  m, problem = _read_manifest(folder)
  if problem is not None:
    raise DamagedCache(f"{_join(folder, MANIFEST)} {problem}: delete it, and minilm-prepare (or the next "
                       "run) lists the shards again")
  if m is None:
    raise FileNotFoundError(f"{_join(folder, MANIFEST)}: no such file (an unfinished preparation: "
                            "minilm-prepare finishes it)")
  return m


def _local_copy(folder: str) -> str:
  """A remote shard folder copied to the local disk cache (only what is missing, or of another size),
  for memory-mapping; each copy checked against the manifest's size and CRC-32."""
  from minilm_jax import remote
  dst = remote.cache_dir("shards", folder)
  os.makedirs(dst, exist_ok=True)
  m = _manifest(folder)
  for s in m["shards"]:
    target = os.path.join(dst, s["name"])
    if _damage(target, s, checksum=False) is not None:
      tmp = f"{target}.tmp-{os.getpid()}"
      _path(_join(folder, s["name"])).copy(_path(tmp), overwrite=True)
      why = _damage(tmp, s, checksum=True)
      if why:
        os.remove(tmp)
        raise _refuse(_join(folder, s["name"]), why)
      os.replace(tmp, target)
  with open(os.path.join(dst, f"{MANIFEST}.tmp-{os.getpid()}"), "w") as f:
    json.dump(m, f)
  os.replace(os.path.join(dst, f"{MANIFEST}.tmp-{os.getpid()}"), os.path.join(dst, MANIFEST))
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
    self.manifest = _manifest(local)
    self.max_len = self.manifest["max_len"]
    self._ids, self._lengths = [], []
    for s in self.manifest["shards"]:
      path = os.path.join(local, s["name"])
      why = _damage(path, s, checksum=False)  # a truncated file would map short (prepare did the rest)
      if why:
        raise _refuse(path, why)
      if not s["rows"]:
        continue
      table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
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
