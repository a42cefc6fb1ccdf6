"""Tokens in, batches out: tokenising, packing, the order of the rows, and per-host batches.

A batch is a dict of int32 numpy arrays `input_ids` [B, T] and `attention_mask` [B, T]. Rows are packed BERT
style: `[CLS] doc_a [SEP] doc_b [SEP] ...` cut every `max_len` tokens, the last row padded. The order is a
pure function of (seed, step), computed per row rather than stored: a resumed run sees exactly the batches
an uninterrupted one would, the checkpoint only needs the step, and a corpus of billions of rows costs no
memory. The rows themselves come from token shards (shards.py) or, for small inputs, from memory.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Dict, Iterator, Sequence

import numpy as np

ORDER = "feistel-1"  # the row order's version, kept in checkpoints: a resume notices a change


def pack_stream(stream: np.ndarray, max_len: int, cls_id: int, pad_id: int):
  """Rows [N, max_len] of `[CLS]` + max_len-1 tokens of `stream` each, and their lengths [N] (the last row
  padded with pad_id). An empty stream gives no rows."""
  if max_len < 2:
    raise ValueError(f"max_len {max_len} is too short: a row needs [CLS] and one token")
  body = max_len - 1
  n = -(-len(stream) // body)
  padded = np.full(n * body, pad_id, stream.dtype)
  padded[:len(stream)] = stream
  ids = np.concatenate([np.full((n, 1), cls_id, stream.dtype), padded.reshape(n, body)], axis=1)
  lengths = np.full(n, max_len, np.int32)
  if n:
    lengths[-1] = 1 + len(stream) - (n - 1) * body
  return ids, lengths


def token_stream(docs, tokenizer, dtype=np.int32, batch_docs: int = 256) -> np.ndarray:
  """`doc_a [SEP] doc_b [SEP] ...` as one array, tokenised a batch of documents at a time."""
  sep = tokenizer.sep_token_id
  out, docs = [], iter(docs)
  while True:
    batch = list(itertools.islice(docs, batch_docs))
    if not batch:
      break
    enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
    out.append(np.fromiter(itertools.chain.from_iterable((*t, sep) for t in enc["input_ids"]), dtype))
  return np.concatenate(out) if out else np.zeros(0, dtype)


def pack(token_lists: Sequence[Sequence[int]], max_len: int, cls_id: int, sep_id: int, pad_id: int):
  """BERT-style packing: [CLS] d1 [SEP] d2 [SEP] ... in rows of max_len; returns (ids, mask) [N, T] int32."""
  stream = np.fromiter((t for toks in token_lists for t in (*toks, sep_id)), dtype=np.int32)
  ids, lengths = pack_stream(stream, max_len, cls_id, pad_id)
  return ids, mask_of(lengths, max_len)


def mask_of(lengths: np.ndarray, max_len: int) -> np.ndarray:
  """attention_mask [N, max_len] of right-padded rows with `lengths` [N] real tokens."""
  return (np.arange(max_len) < lengths[:, None]).astype(np.int32)


def tokenize_and_pack(docs: Sequence[str], tokenizer, max_len: int) -> Dict[str, np.ndarray]:
  """Token rows {"input_ids", "attention_mask"} [N, max_len] of documents in memory (evaluation, tests);
  a training corpus goes through shards.py, which packs each piece the same way."""
  ids, lengths = pack_stream(token_stream(docs, tokenizer), max_len, tokenizer.cls_token_id,
                             tokenizer.pad_token_id)
  return {"input_ids": ids, "attention_mask": mask_of(lengths, max_len)}


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection of uint64 whose every output bit depends on every input bit."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def permute(i: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
  """A pseudo-random permutation of range(n), evaluated at positions `i` (int64) without building it:
  a balanced Feistel network on 2·h bits (4^h ≥ n) whose rounds hash (half, key, round), walked
  again while the value falls outside [0, n) (fewer than 4 walks expected). Memory O(len(i)) for any n."""
  i = np.asarray(i, np.int64)
  if n <= 1:
    return np.zeros_like(i)
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  low = np.uint64((1 << half) - 1)
  keys = [_mix(_mix(np.uint64(key & ((1 << 64) - 1))) ^ np.uint64(r + 1)) for r in range(rounds)]

  def feistel(x):
    left, right = x >> np.uint64(half), x & low
    for k in keys:
      left, right = right, left ^ (_mix(right ^ k) & low)
    return (left << np.uint64(half)) | right

  x = feistel(i.astype(np.uint64))
  out = x >= np.uint64(n)
  while out.any():  # cycle walking: a permutation of [0, 4^h) restricted to [0, n) stays one
    x[out] = feistel(x[out])
    out = x >= np.uint64(n)
  return x.astype(np.int64)


def batch_rows(step: int, global_batch: int, num_rows: int, seed: int) -> np.ndarray:
  """Row indices [global_batch] of batch `step`: epoch after epoch, each a different seeded permutation
  of all rows, computed for just these positions."""
  g = step * global_batch + np.arange(global_batch, dtype=np.int64)
  epochs, within = g // num_rows, g % num_rows
  out = np.empty(global_batch, np.int64)
  for e in np.unique(epochs):
    key = int(_mix(np.uint64(seed & ((1 << 64) - 1)) ^ _mix(np.uint64(int(e) + 1))))
    out[epochs == e] = permute(within[epochs == e], num_rows, key)
  return out


def host_batch(rows, step: int, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1) -> Dict[str, np.ndarray]:
  """This host's slice of global batch `step` (every host computes the same global order). `rows`: the
  token rows, `shards.Rows` or a dict of arrays [N, T] (tokenize_and_pack)."""
  if global_batch % process_count:
    raise ValueError(f"batch_size {global_batch} does not divide over {process_count} hosts")
  in_memory = isinstance(rows, dict)
  idx = batch_rows(step, global_batch, len(rows["input_ids"]) if in_memory else len(rows), seed)
  per = global_batch // process_count
  idx = idx[process_index * per:(process_index + 1) * per]
  return {k: v[idx] for k, v in rows.items()} if in_memory else rows.take(idx)


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
