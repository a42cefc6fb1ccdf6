"""Corpus: text sources, cut into pieces that read back as the whole, and the source's identity."""

import hashlib
import json
import os
import random

import numpy as np
import pytest

from minilm_jax import corpus


# --- load_texts ---------------------------------------------------------------------------------------


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write((json.dumps(r) if r is not None else "") + "\n")


def write_parquet(path, columns):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table(columns), str(path))


def test_load_texts_in_memory_list_drops_empty_docs():
  assert corpus.load_texts(["a b", "", "  \n", "c", None, 3]) == ["a b", "c"]
  assert corpus.load_texts(("x", "y")) == ["x", "y"]


def test_load_texts_txt_blank_line_separated(tmp_path):
  p = tmp_path / "c.txt"
  p.write_text("first doc\nstill first\n\n\n  second doc  \n\n\n\n\nthird\n", encoding="utf-8")
  assert corpus.load_texts(str(p)) == ["first doc\nstill first", "second doc", "third"]


def test_load_texts_jsonl_with_text_field(tmp_path):
  p = tmp_path / "c.jsonl"
  write_jsonl(p, [{"body": "one", "id": 1}, None, {"body": "", "id": 2}, {"body": "zwei ü", "id": 3}])
  assert corpus.load_texts(str(p), text_field="body") == ["one", "zwei ü"]


def test_load_texts_parquet(tmp_path):
  p = tmp_path / "c.parquet"
  write_parquet(p, {"id": [1, 2, 3, 4], "text": ["alpha", None, "", "beta gamma"]})
  assert corpus.load_texts(str(p)) == ["alpha", "beta gamma"]


def test_load_texts_folder_sorted_and_mixed(tmp_path):
  pytest.importorskip("pyarrow")
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("b1\n\nb2")
  (tmp_path / "a.txt").write_text("a1")
  write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "c1"}, {"text": "c2"}])
  write_parquet(tmp_path / "ab.parquet", {"text": ["p1", "p2"]})
  (tmp_path / "notes.md").write_text("not a source")
  (tmp_path / "empty.txt").write_text("\n\n")
  # Sorted by path: a.txt, ab.parquet, b.txt, empty.txt, sub/c.jsonl.
  assert corpus.load_texts(str(tmp_path)) == ["a1", "p1", "p2", "b1", "b2", "c1", "c2"]


def test_load_texts_no_documents(tmp_path):
  p = tmp_path / "empty.txt"
  p.write_text("")
  for source in (str(p), [], ["", "   "]):
    with pytest.raises(ValueError, match="no non-empty documents"):
      corpus.load_texts(source)
  (tmp_path / "blank.txt").write_text("\n\n\n")
  with pytest.raises(ValueError, match="no non-empty documents"):
    corpus.load_texts(str(tmp_path))


def test_load_texts_missing_text_field_jsonl(tmp_path):
  p = tmp_path / "c.jsonl"
  write_jsonl(p, [{"body": "x", "id": 1}])
  with pytest.raises(ValueError, match=r"'text'.*\['body', 'id'\]"):
    corpus.load_texts(str(p))


def test_load_texts_missing_text_field_parquet(tmp_path):
  p = tmp_path / "c.parquet"
  write_parquet(p, {"body": ["x"], "id": [1]})
  with pytest.raises(ValueError, match=r"'content'.*\['body', 'id'\]"):
    corpus.load_texts(str(p), text_field="content")


def test_load_texts_missing_path():
  with pytest.raises(FileNotFoundError, match="/nonexistent/x.txt"):
    corpus.load_texts("/nonexistent/x.txt")
  with pytest.raises(FileNotFoundError):
    corpus.load_texts("./nonexistent-folder")


def test_load_texts_unsupported_file_type(tmp_path):
  p = tmp_path / "c.csv"
  p.write_text("text\nhello\n")
  with pytest.raises(ValueError, match="unsupported file type"):
    corpus.load_texts(str(p))


@pytest.fixture(scope="module")
def stdlib_splits():
  return corpus.load_texts(corpus.STDLIB), corpus.load_texts(corpus.STDLIB, split="heldout")


def test_stdlib_corpus(stdlib_splits):
  train, heldout = stdlib_splits
  assert len(train) > 1000 and len(heldout) > 0
  assert all(isinstance(d, str) and d.strip() for d in train + heldout)
  assert not set(train) & set(heldout)
  held = lambda d: int(hashlib.sha1(d.encode()).hexdigest(), 16) % 5 == 0
  assert all(held(d) for d in heldout) and not any(held(d) for d in train)
  # Roughly one document in 5 is held out.
  assert 0.1 < len(heldout) / (len(train) + len(heldout)) < 0.3
  corpus.stdlib_corpus.cache_clear()  # read the files again: the same documents in the same order
  assert corpus.load_texts(corpus.STDLIB, split="heldout") == heldout  # deterministic
  with pytest.raises(ValueError, match="split"):
    corpus.stdlib_corpus("test")


def test_pydocs_corpus_adds_installed_packages_docstrings(stdlib_splits, tmp_path, monkeypatch):
  import sysconfig
  train, heldout = stdlib_splits
  pkg = tmp_path / "site" / "somepkg"
  (pkg / "tests").mkdir(parents=True)
  docs = [f"Document {i}: " + "words about the package " * 12 for i in range(40)]
  body = "".join(f'def f{i}():\n  """{d}"""\n\n' for i, d in enumerate(docs))
  (pkg / "mod.py").write_text(f'"""{docs[0]}"""\n\n' + body)  # docs[0] twice: kept once
  (pkg / "other.py").write_text('"""Too short to keep."""\n')
  (pkg / "tests" / "test_x.py").write_text('"""' + "test prose " * 30 + '"""\n')  # tests are skipped
  (pkg / "broken.py").write_text("def (:\n")  # unparsable files are skipped
  paths = dict(sysconfig.get_paths(), purelib=str(tmp_path / "site"), platlib=str(tmp_path / "site"))
  monkeypatch.setattr(sysconfig, "get_paths", lambda: paths)
  corpus.pydocs_corpus.cache_clear()
  try:
    p_train, p_heldout = corpus.load_texts(corpus.PYDOCS), corpus.load_texts(corpus.PYDOCS, split="heldout")
  finally:
    corpus.pydocs_corpus.cache_clear()
  # Everything the stdlib corpus holds out is held out here too; the package's docs are split the same way.
  assert set(p_heldout) >= set(heldout) and set(p_train) >= set(train)
  assert set(p_train + p_heldout) == set(train) | set(heldout) | set(docs)
  assert len(p_train) + len(p_heldout) == len(set(p_train + p_heldout))  # no duplicates
  held = lambda d: int(hashlib.sha1(d.encode()).hexdigest(), 16) % 5 == 0
  assert all(held(d) for d in p_heldout) and not any(held(d) for d in p_train)
  with pytest.raises(ValueError, match="split"):
    corpus.pydocs_corpus("test")




# --- pieces ---------------------------------------------------------------------------------------------


def random_docs(rng, n):
  words = ["alpha", "beta", "gamma", "déjà", "vu", "naïve", "x", "lorem", "ipsum", "日本"]
  return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) +
          ("\nsecond line of it" if rng.random() < 0.3 else "") for _ in range(n)]


def read_all(parts):
  return [d for p in parts for d in corpus.read_piece(p)]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_txt_pieces_read_back_as_the_whole_file(tmp_path, newline):
  rng = random.Random(0)
  docs = random_docs(rng, 400)
  text = ""
  for d in docs:  # runs of 1-4 blank lines, some with spaces, between documents
    text += d.replace("\n", newline) + newline + "".join(rng.choice(["", "  "]) + newline
                                                         for _ in range(rng.randint(1, 4)))
  p = tmp_path / "c.txt"
  p.write_bytes(text.encode())
  whole = corpus.pieces(str(p))
  assert len(whole) == 1 and read_all(whole) == [d.strip() for d in docs]
  for piece_bytes in (1, 97, 1000, 4096):
    parts = corpus.pieces(str(p), piece_bytes=piece_bytes)
    assert len(parts) > 1 and all(a.end == b.start for a, b in zip(parts, parts[1:]))
    assert read_all(parts) == read_all(whole), piece_bytes


def test_jsonl_pieces_read_back_as_the_whole_file(tmp_path):
  docs = random_docs(random.Random(1), 300)
  p = tmp_path / "c.jsonl"
  write_jsonl(p, [{"text": d, "n": i} if i % 7 else None for i, d in enumerate(docs)])
  want = [d for i, d in enumerate(docs) if i % 7]
  assert read_all(corpus.pieces(str(p))) == want
  parts = corpus.pieces(str(p), piece_bytes=500)
  assert len(parts) > 10 and read_all(parts) == want


def test_parquet_pieces_are_row_groups(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  docs = random_docs(random.Random(2), 500)
  p = tmp_path / "c.parquet"
  pq.write_table(pa.table({"text": docs}), str(p), row_group_size=40)
  assert read_all(corpus.pieces(str(p))) == docs
  parts = corpus.pieces(str(p), piece_bytes=1)
  assert len(parts) == 13 and read_all(parts) == docs  # one piece per row group


def test_in_memory_pieces_keep_the_order(tmp_path):
  docs = random_docs(random.Random(3), 200)
  parts = corpus.pieces(docs, piece_bytes=300)
  assert len(parts) > 5 and read_all(parts) == docs


def test_hub_dataset_is_streamed_one_piece_per_data_file(tmp_path, monkeypatch):
  """A hub name goes to datasets.load_dataset(..., streaming=True); here the 'hub' is local parquet
  files, so the sharding by data file is the library's own."""
  pa = pytest.importorskip("pyarrow")
  import datasets
  import pyarrow.parquet as pq
  docs = random_docs(random.Random(4), 90)
  files = []
  for i in range(3):
    files.append(str(tmp_path / f"part-{i}.parquet"))
    pq.write_table(pa.table({"text": docs[30 * i:30 * (i + 1)], "id": list(range(30))}), files[-1])
  real = datasets.load_dataset
  seen = []

  def fake(name, config=None, split=None, streaming=False):
    seen.append((name, config, split, streaming))
    return real("parquet", data_files=files, split="train", streaming=streaming)

  monkeypatch.setattr(datasets, "load_dataset", fake)
  parts = corpus.pieces("someone/corpus", hub_config="en", split="train")
  assert [p.start for p in parts] == [0, 1, 2] and all(p.num_shards == 3 for p in parts)
  assert read_all(parts) == docs and corpus.load_texts("someone/corpus") == docs
  assert seen[0] == ("someone/corpus", "en", "train", True)
  with pytest.raises(ValueError, match="no text field 'body'"):
    read_all(corpus.pieces("someone/corpus", text_field="body"))


def test_hub_errors_are_one_line(monkeypatch):
  import datasets

  def fail(*a, **k):
    raise ConnectionError("offline\nmore lines")

  monkeypatch.setattr(datasets, "load_dataset", fail)
  with pytest.raises(ValueError, match=r"could not load it \(ConnectionError: offline\)$"):
    corpus.pieces("nobody/nothing")


def test_a_byte_order_mark_is_not_text(tmp_path):
  # Windows editors start UTF-8 files with one; json.loads refuses it and it is no part of a document.
  docs = random_docs(random.Random(2), 50)
  t = tmp_path / "c.txt"
  t.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(docs).encode())
  j = tmp_path / "c.jsonl"
  j.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
  for f in (t, j):
    assert corpus.load_texts(str(f)) == [d.strip() for d in docs]
    assert read_all(corpus.pieces(str(f), piece_bytes=200)) == [d.strip() for d in docs]


def test_bad_utf8_and_bad_json_name_the_file(tmp_path):
  p = tmp_path / "c.txt"
  p.write_bytes(b"fine\n\n\xff\xfe broken\n")
  with pytest.raises(ValueError, match=r"c.txt: not UTF-8 text \(near byte 6\)"):
    corpus.load_texts(str(p))
  q = tmp_path / "c.jsonl"
  q.write_text('{"text": "ok"}\n{"text": \n')
  with pytest.raises(ValueError, match=r"c.jsonl: not JSON Lines \(near byte 15"):
    corpus.load_texts(str(q))


# --- source_identity ------------------------------------------------------------------------------------


def identity(source, **kw):
  return corpus.source_identity(source, corpus.pieces(source, **kw))


def test_identity_is_the_same_for_the_same_files_anywhere(tmp_path):
  for host in ("a", "b"):
    (tmp_path / host / "sub").mkdir(parents=True)
    (tmp_path / host / "x.txt").write_text("one\n\ntwo\n")
    write_jsonl(tmp_path / host / "sub" / "y.jsonl", [{"text": "three"}])
  assert identity(str(tmp_path / "a")) == identity(str(tmp_path / "b") + "/")
  assert identity(str(tmp_path / "a" / "x.txt")) == identity(str(tmp_path / "b" / "x.txt"))
  (tmp_path / "b" / "x.txt").write_text("one\n\ntwo!\n")  # content changed
  assert identity(str(tmp_path / "a")) != identity(str(tmp_path / "b"))
  (tmp_path / "b" / "x.txt").write_text("one\n\ntwo\n")
  os.rename(tmp_path / "b" / "sub" / "y.jsonl", tmp_path / "b" / "sub" / "z.jsonl")  # renamed
  assert identity(str(tmp_path / "a")) != identity(str(tmp_path / "b"))


def test_identity_of_a_big_file_sees_changes(tmp_path):
  rng = np.random.default_rng(0)
  text = "\n\n".join(" ".join(map(str, rng.integers(0, 10 ** 6, 50))) for _ in range(20000))
  p = tmp_path / "big.txt"
  p.write_text(text)
  before = identity(str(p))
  assert identity(str(p), piece_bytes=1 << 20) != before  # other pieces, other shards
  p.write_text(text[:-9] + "#" + text[-8:])  # the same size, a byte changed in the last block
  assert identity(str(p)) != before
  p.write_text(text + "\n\nmore")
  assert identity(str(p)) != before


def test_identity_of_documents_in_memory():
  assert identity(["a", "b"]) == identity(["a", "b"]) != identity(["a", "c"])
  assert identity(["a", "b"]) != identity(["b", "a"])


# --- Sentences ---------------------------------------------------------------------------------------

def test_sentences_of_spaced_and_unspaced_scripts():
  # Spaced scripts: a stop and whitespace end a sentence; under 4 words is dropped; a stop inside a
  # quotation is not followed by whitespace, so it does not end the sentence that quotes it.
  assert corpus.sentences('It printed "Hello, world!" to the screen. Short one. The next one\nruns on.') \
      == ['It printed "Hello, world!" to the screen.', "The next one runs on."]
  # Chinese and Japanese: no space after 。！？, and split() sees one word, so length is in characters.
  zh = "Rust 是一种系统编程语言。它注重安全、速度和并发性！你想学它吗？它的编译器会检查内存安全。"
  assert corpus.sentences(zh) == ["Rust 是一种系统编程语言。", "它注重安全、速度和并发性！",
                                  "它的编译器会检查内存安全。"]   # 你想学它吗: 5 characters, too short
  ja = "「こんにちは、元気ですか。」と彼は言いました。それから二人は駅まで歩きました。"
  assert corpus.sentences(ja) == ["「こんにちは、元気ですか。」と彼は言いました。", "それから二人は駅まで歩きました。"]
