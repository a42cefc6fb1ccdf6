"""Data: packing, the resumable batch order (computed per row), host slicing and prefetching."""

import threading
import time

import numpy as np
import pytest

from minilm_jax import corpus, data

CLS, SEP, PAD = 2, 3, 0


def oracle_pack(token_lists, max_len, cls_id=CLS, sep_id=SEP, pad_id=PAD):
  """Plain-python packing: the stream [tok..., SEP] per doc, cut in rows of max_len - 1, CLS in front."""
  stream = []
  for toks in token_lists:
    stream.extend(list(toks) + [sep_id])
  body = max_len - 1
  ids, mask = [], []
  for i in range(0, len(stream), body):
    piece = stream[i:i + body]
    pad = body - len(piece)
    ids.append([cls_id] + piece + [pad_id] * pad)
    mask.append([1] * (1 + len(piece)) + [0] * pad)
  return ids, mask


def random_docs(rng, n, max_doc_len=9):
  return [list(rng.integers(10, 99, size=rng.integers(0, max_doc_len + 1))) for _ in range(n)]


# --- pack -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_len", [2, 3, 5, 8, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_matches_oracle(max_len, seed):
  docs = random_docs(np.random.default_rng(seed), 7)
  ids, mask = data.pack(docs, max_len, CLS, SEP, PAD)
  want_ids, want_mask = oracle_pack(docs, max_len)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.shape == mask.shape == (len(want_ids), max_len)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)


def test_pack_stream_an_exact_multiple_of_the_row_body():
  # Stream: 3+1 + 4+1 + 5+1 = 15 tokens = 3 rows of body 5: no padding at all, no empty extra row.
  docs = [[11, 12, 13], [21, 22, 23, 24], [31, 32, 33, 34, 35]]
  ids, mask = data.pack(docs, 6, CLS, SEP, PAD)
  want_ids, want_mask = oracle_pack(docs, 6)
  assert len(want_ids) == 3 and all(want_mask[-1])
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_array_equal(ids, [[CLS, 11, 12, 13, SEP, 21], [CLS, 22, 23, 24, SEP, 31],
                                      [CLS, 32, 33, 34, 35, SEP]])


def test_pack_one_token_short_of_a_multiple():
  docs = [[11, 12, 13], [21, 22, 23]]  # 8 tokens, body 3: rows of 3, 3, 2 (+1 pad)
  ids, mask = data.pack(docs, 4, CLS, SEP, PAD)
  np.testing.assert_array_equal(ids, [[CLS, 11, 12, 13], [CLS, SEP, 21, 22], [CLS, 23, SEP, PAD]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])


@pytest.mark.parametrize("max_len", [1, 0, -3])
def test_pack_rejects_max_len_below_two(max_len):
  with pytest.raises(ValueError, match="too short"):
    data.pack([[11, 12]], max_len, CLS, SEP, PAD)


# --- batch_rows / host_batch -------------------------------------------------------------------------


@pytest.mark.parametrize("num_rows,batch", [(10, 5), (10, 4), (7, 3), (3, 8), (1, 2)])
def test_batch_rows_epochs_are_permutations(num_rows, batch):
  epochs = 4
  steps = -(-epochs * num_rows // batch)
  flat = np.concatenate([data.batch_rows(s, batch, num_rows, seed=0) for s in range(steps)])
  assert flat.shape == (steps * batch,)
  perms = [flat[e * num_rows:(e + 1) * num_rows] for e in range(epochs)]
  for p in perms:
    assert sorted(p.tolist()) == list(range(num_rows))
  if num_rows >= 7:  # actually shuffled, and differently from one epoch to the next
    assert any(p.tolist() != list(range(num_rows)) for p in perms)
    assert len({tuple(p.tolist()) for p in perms}) > 1


def test_batch_rows_straddling_an_epoch_boundary():
  # 7 rows, batches of 3: batch 2 takes the last row of epoch 0 and the first two of epoch 1.
  b = [data.batch_rows(s, 3, 7, seed=5) for s in range(3)]
  epoch0 = np.concatenate([b[0], b[1], b[2][:1]])
  assert sorted(epoch0.tolist()) == list(range(7))
  epoch1_head = b[2][1:]
  later = np.concatenate([data.batch_rows(s, 3, 7, seed=5) for s in range(3, 5)])
  assert sorted(np.concatenate([epoch1_head, later[:5]]).tolist()) == list(range(7))
  assert epoch1_head.tolist() != epoch0[:2].tolist()  # a new permutation for the new epoch


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000, 4099])
def test_permute_is_a_permutation(n):
  for key in (0, 1, 2 ** 63 + 5):
    assert sorted(data.permute(np.arange(n), n, key).tolist()) == list(range(n))


def test_permute_shuffles_and_keys_differ():
  n = 20_000
  p, q = data.permute(np.arange(n), n, 7), data.permute(np.arange(n), n, 8)
  assert abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.05  # no trace of the input order
  assert abs(np.corrcoef(p, q)[0, 1]) < 0.05  # another key, another order
  # Neighbours are scattered: few consecutive positions land on consecutive rows.
  assert np.mean(np.abs(np.diff(p)) == 1) < 0.01


def test_batch_rows_of_a_huge_corpus_cost_only_the_batch():
  # 10^12 rows: a stored permutation would need 8 TB; a batch is computed from its positions alone.
  rows = data.batch_rows(123_456_789, 256, 10 ** 12, seed=1)
  assert rows.shape == (256,) and len(set(rows.tolist())) == 256
  assert rows.min() >= 0 and rows.max() < 10 ** 12
  np.testing.assert_array_equal(rows, data.batch_rows(123_456_789, 256, 10 ** 12, seed=1))


def test_batch_rows_seeded_and_pure():
  seq = [data.batch_rows(s, 6, 50, seed=3) for s in range(20)]
  again = [data.batch_rows(s, 6, 50, seed=3) for s in range(20)]
  other = [data.batch_rows(s, 6, 50, seed=4) for s in range(20)]
  for a, b in zip(seq, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(seq, other))
  # Batch k alone, in reverse order, equals batch k reached after 0..k-1: a function of (seed, step).
  for k in reversed(range(20)):
    np.testing.assert_array_equal(data.batch_rows(k, 6, 50, seed=3), seq[k])


def fake_rows(n, t=4):
  ids = np.arange(n * t, dtype=np.int32).reshape(n, t)
  return {"input_ids": ids, "attention_mask": (ids % 3 != 0).astype(np.int32)}


@pytest.mark.parametrize("step", [0, 1, 5, 13])
def test_host_batch_slices_concatenate_to_the_global_batch(step):
  rows = fake_rows(11)
  glob = data.host_batch(rows, step, 8, seed=2)
  idx = data.batch_rows(step, 8, 11, seed=2)
  for k in rows:
    np.testing.assert_array_equal(glob[k], rows[k][idx])
  parts = [data.host_batch(rows, step, 8, seed=2, process_index=i, process_count=4) for i in range(4)]
  for k in rows:
    assert all(p[k].shape == (2, 4) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), glob[k])


def test_host_batch_not_divisible_over_hosts():
  with pytest.raises(ValueError, match=r"\b6\b.*\b4\b"):
    data.host_batch(fake_rows(10), 0, 6, seed=0, process_index=0, process_count=4)


# --- tokenize_and_pack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(tiny_teacher)


def test_tokenize_and_pack_rows_decode_to_docs(tokenizer, tiny_corpus):
  docs = corpus.load_texts(tiny_corpus)
  assert len(docs) == 5
  out = data.tokenize_and_pack(docs, tokenizer, 16)
  ids, mask = out["input_ids"], out["attention_mask"]
  assert ids.shape == mask.shape and ids.shape[1] == 16
  assert np.all(ids[:, 0] == tokenizer.cls_token_id)
  assert np.all(mask[:-1] == 1) and np.all(ids[mask == 0] == tokenizer.pad_token_id)
  stream = ids[:, 1:][mask[:, 1:] == 1].tolist()
  assert stream[-1] == tokenizer.sep_token_id
  segments, cur = [], []
  for t in stream:
    if t == tokenizer.sep_token_id:
      segments.append(cur)
      cur = []
    else:
      cur.append(t)
  assert len(segments) == len(docs)
  assert tokenizer.unk_token_id not in stream, "the tiny tokenizer maps text to [UNK]"
  squash = lambda s: "".join(s.lower().split())
  for seg, doc in zip(segments, docs):
    assert squash(tokenizer.decode(seg)) == squash(doc)


def test_tokenize_and_pack_many_docs_in_order(tokenizer):
  # More docs than one tokeniser chunk (256): the order must survive the chunking.
  docs = [f"doc {i} " + "xyz"[i % 3] * (i % 7) for i in range(600)]
  out = data.tokenize_and_pack(docs, tokenizer, 24)
  per_doc = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
  want_ids, want_mask = oracle_pack(per_doc, 24, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                    tokenizer.pad_token_id)
  np.testing.assert_array_equal(out["input_ids"], want_ids)
  np.testing.assert_array_equal(out["attention_mask"], want_mask)


# --- prefetch -------------------------------------------------------------------------------------------


def test_prefetch_yields_steps_in_order():
  assert list(data.prefetch(lambda s: {"x": s * s}, 3, 11)) == [(s, {"x": s * s}) for s in range(3, 11)]
  assert list(data.prefetch(lambda s: s, 5, 5)) == []
  slow = lambda s: (time.sleep(0.002 * (s % 3)), s)[1]
  assert list(data.prefetch(slow, 0, 20, depth=1)) == [(s, s) for s in range(20)]


def run_with_timeout(fn, timeout=10.0):
  """Run fn on a thread; fail (instead of hanging the suite) if it does not finish."""
  result = {}

  def target():
    try:
      result["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      result["error"] = e

  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(timeout)
  assert not t.is_alive(), "prefetch hung"
  if "error" in result:
    raise result["error"]
  return result["value"]


def test_prefetch_reraises_errors_in_the_consumer():
  class Boom(Exception):
    pass

  def make(step):
    if step == 4:
      raise Boom(f"bad step {step}")
    return step

  def consume():
    got = []
    with pytest.raises(Boom, match="bad step 4"):
      for step, item in data.prefetch(make, 0, 10):
        got.append((step, item))
    return got

  assert run_with_timeout(consume) == [(s, s) for s in range(4)]


def test_prefetch_break_early_does_not_hang():
  calls = []

  def make(step):
    calls.append(step)
    return np.full(4, step)

  def consume():
    got = []
    for step, item in data.prefetch(make, 0, 10_000, depth=2):
      got.append(step)
      np.testing.assert_array_equal(item, np.full(4, step))
      if step == 2:
        break
    return got

  assert run_with_timeout(consume) == [0, 1, 2]
  time.sleep(0.2)
  assert len(calls) < 10, "the worker kept building batches after the consumer left"
  assert calls == list(range(len(calls)))


def test_prefetch_leaves_no_worker_behind_once_closed():
  # A worker thread alive at interpreter exit can abort the process (seen after a SIGTERM stop), so
  # closing the generator (a `return` out of the loop does) must also end its thread.
  release = threading.Event()

  def make(step):
    if step == 3:
      release.wait(5)  # the worker is busy building a batch when the consumer leaves
    return step

  def consume():
    before = set(threading.enumerate())
    gen = data.prefetch(make, 0, 10_000, depth=1)
    assert [next(gen)[0] for _ in range(2)] == [0, 1]
    threading.Timer(0.2, release.set).start()
    gen.close()
    return [t for t in set(threading.enumerate()) - before if not isinstance(t, threading.Timer)]

  assert run_with_timeout(consume) == []
