"""Token shards: made once in parallel, reused, resumed after kill -9, split over hosts, read by index."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from minilm_jax import corpus, data, shards


@pytest.fixture(scope="module")
def tok(tiny_teacher):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(tiny_teacher)


def write_corpus(path, n_docs, seed=0):
  rng = random.Random(seed)
  words = ["attention", "relation", "student", "teacher", "query", "key", "value", "head", "layer"]
  docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 80))) + "." for _ in range(n_docs)]
  path.write_text("\n\n".join(docs) + "\n")
  return docs


def shard_bytes(folder):
  return {os.path.basename(f): open(f, "rb").read() for f in sorted(glob.glob(f"{folder}/shard-*.arrow"))}


def test_rows_are_the_packed_corpus(tiny_teacher, tiny_corpus, tok, tmp_path):
  folder = shards.prepare(tiny_corpus, tiny_teacher, 16, str(tmp_path / "cache"), log=lambda m: None)
  rows = shards.Rows(folder)
  want = data.tokenize_and_pack(corpus.load_texts(tiny_corpus), tok, 16)
  assert len(rows) == len(want["input_ids"])
  got = rows.take(np.arange(len(rows)))
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
  assert got["input_ids"].dtype == np.int32 and got["attention_mask"].dtype == np.int32
  some = np.array([5, 0, 5, len(rows) - 1])
  np.testing.assert_array_equal(rows.take(some)["input_ids"], want["input_ids"][some])
  m = rows.manifest
  assert m["docs"] == 5 and m["rows"] == len(rows) and m["dtype"] == "uint16"
  assert m["tokens"] == int(want["attention_mask"][:, 1:].sum())  # every token but the [CLS]s


def test_pieces_become_shards_the_same_with_one_or_two_processes(tiny_teacher, tok, tmp_path):
  docs = write_corpus(tmp_path / "c.txt", 300)
  kw = dict(piece_bytes=4000, log=lambda m: None)
  one = shards.prepare(str(tmp_path / "c.txt"), tiny_teacher, 32, str(tmp_path / "one"), num_proc=1, **kw)
  two = shards.prepare(str(tmp_path / "c.txt"), tiny_teacher, 32, str(tmp_path / "two"), num_proc=2, **kw)
  assert os.path.basename(one) == os.path.basename(two)  # same inputs, same fingerprint
  a, b = shard_bytes(one), shard_bytes(two)
  assert len(a) > 5 and a == b
  # Each shard packs its own piece: the rows are the pieces' packings, one after another.
  parts = corpus.pieces(str(tmp_path / "c.txt"), piece_bytes=4000)
  want = [data.tokenize_and_pack(list(corpus.read_piece(p)), tok, 32)["input_ids"] for p in parts]
  rows = shards.Rows(one)
  np.testing.assert_array_equal(rows.take(np.arange(len(rows)))["input_ids"], np.concatenate(want))
  assert rows.manifest["docs"] == len(docs)


def test_rows_are_views_of_the_mapped_shards(tiny_teacher, tiny_corpus, tmp_path):
  # Nothing the size of the corpus in memory: opening the shards allocates no Arrow buffer (a copy would:
  # combine_chunks did, and a run over 1 GB of text held all its token ids).
  import pyarrow as pa
  folder = shards.prepare(tiny_corpus, tiny_teacher, 16, str(tmp_path / "cache"), log=lambda m: None)
  shards.Rows(folder)  # Arrow's one-time allocations
  before = pa.total_allocated_bytes()
  rows = shards.Rows(folder)
  assert pa.total_allocated_bytes() == before
  assert not rows._ids[0].flags.owndata and not rows._lengths[0].flags.owndata


def test_prepared_shards_are_reused_and_keyed_by_their_inputs(tiny_teacher, tiny_corpus, tmp_path,
                                                             monkeypatch):
  cache = str(tmp_path / "cache")
  first = shards.prepare(tiny_corpus, tiny_teacher, 16, cache, log=lambda m: None)
  monkeypatch.setattr(shards, "_make_shard", lambda *a: pytest.fail("tokenised again"))
  assert shards.prepare(tiny_corpus, tiny_teacher, 16, cache) == first
  monkeypatch.undo()
  other_len = shards.prepare(tiny_corpus, tiny_teacher, 24, cache, log=lambda m: None)
  other_docs = shards.prepare(corpus.load_texts(tiny_corpus)[:-1], tiny_teacher, 16, cache,
                              log=lambda m: None)
  assert len({first, other_len, other_docs}) == 3
  assert sorted(os.listdir(cache)) == sorted(os.path.basename(f) for f in (first, other_len, other_docs))


def test_a_shard_opens_with_hugging_face_datasets(tiny_teacher, tiny_corpus, tmp_path):
  import datasets
  folder = shards.prepare(tiny_corpus, tiny_teacher, 16, str(tmp_path), log=lambda m: None)
  ds = datasets.Dataset.from_file(os.path.join(folder, "shard-00000.arrow"))
  rows = shards.Rows(folder)
  assert ds.num_rows == len(rows) and ds.column_names == ["input_ids", "length"]
  np.testing.assert_array_equal(np.array(ds["input_ids"]), rows.take(np.arange(len(rows)))["input_ids"])


PREPARE = ("import sys; from minilm_jax import shards; "
           "shards.prepare(sys.argv[1], sys.argv[2], 32, sys.argv[3], num_proc=1, piece_bytes=20000)")


def test_killed_preparation_resumes_to_the_same_shards(tiny_teacher, tmp_path):
  write_corpus(tmp_path / "c.txt", 6000, seed=1)
  args = [str(tmp_path / "c.txt"), tiny_teacher]
  env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  subprocess.run([sys.executable, "-c", PREPARE, *args, str(tmp_path / "whole")], check=True, env=env,
                 capture_output=True)
  (whole,) = glob.glob(str(tmp_path / "whole" / "*"))
  want = shard_bytes(whole)
  assert len(want) > 20

  p = subprocess.Popen([sys.executable, "-c", PREPARE, *args, str(tmp_path / "cut")], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and len(glob.glob(str(tmp_path / "cut" / "*" / "shard-*.arrow"))) < 3:
    time.sleep(0.01)
  p.send_signal(signal.SIGKILL)
  p.wait()
  (cut,) = glob.glob(str(tmp_path / "cut" / "*"))
  done = shard_bytes(cut)
  assert 3 <= len(done) < len(want), "kill -9 came too late to test a resume"
  assert not os.path.exists(os.path.join(cut, shards.MANIFEST))
  with pytest.raises(FileNotFoundError):
    shards.Rows(cut)  # no manifest: not a finished preparation
  open(os.path.join(cut, shards.shard_name(len(done)) + ".tmp-999"), "wb").write(b"torn")
  before = {n: os.stat(os.path.join(cut, n)).st_mtime_ns for n in done}
  subprocess.run([sys.executable, "-c", PREPARE, *args, str(tmp_path / "cut")], env=env,
                 capture_output=True, check=True)
  assert shard_bytes(cut) == want
  assert {n: os.stat(os.path.join(cut, n)).st_mtime_ns for n in done} == before  # not redone
  assert not [f for f in os.listdir(cut) if ".tmp-" in f]
  assert len(shards.Rows(cut)) == len(shards.Rows(whole))


def test_no_documents_leaves_nothing_behind(tiny_teacher, tmp_path):
  (tmp_path / "blank.txt").write_text("\n\n  \n")
  cache = tmp_path / "cache"
  for source in (str(tmp_path / "blank.txt"), [], ["", "  "]):
    with pytest.raises(ValueError, match="no non-empty documents"):
      shards.prepare(source, tiny_teacher, 16, str(cache))
    assert not cache.exists()
  cache.mkdir()
  (cache / "keep").write_text("x")
  with pytest.raises(ValueError, match="no non-empty documents"):
    shards.prepare(str(tmp_path / "blank.txt"), tiny_teacher, 16, str(cache))
  assert os.listdir(cache) == ["keep"]


def test_bad_input_found_while_tokenising_leaves_the_cache_as_it_was(tiny_teacher, tmp_path):
  rows = [{"text": f"document {i}"} for i in range(50)] + [{"body": "no text field"}]
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  cache = tmp_path / "cache"
  for num_proc in (1, 2):  # the error comes back from a worker process the same way
    with pytest.raises(ValueError, match="no text field 'text'"):
      shards.prepare(str(tmp_path / "c.jsonl"), tiny_teacher, 16, str(cache), num_proc=num_proc,
                     piece_bytes=200)
    assert not cache.exists()


def test_a_remote_folder_is_read_from_a_local_copy(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
  # etils.epath reads gs:// the way it reads this local folder: the copying code is the same.
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  folder = shards.prepare(tiny_corpus, tiny_teacher, 16, str(tmp_path / "bucket"), log=lambda m: None)
  local = shards._local_copy(folder)
  assert local.startswith(str(tmp_path / "home")) and shard_bytes(local) == shard_bytes(folder)
  stamp = os.stat(os.path.join(local, "shard-00000.arrow")).st_mtime_ns
  assert shards._local_copy(folder) == local
  assert os.stat(os.path.join(local, "shard-00000.arrow")).st_mtime_ns == stamp  # copied once
  a, b = shards.Rows(local), shards.Rows(folder)
  np.testing.assert_array_equal(a.take(np.arange(len(a)))["input_ids"],
                                b.take(np.arange(len(b)))["input_ids"])


def fake_hosts(n):
  """n shards.Hosts for n threads of one process: a barrier and an all-gather, each of which fails (as
  jax.distributed's would hang) where the hosts do not all make the same call at the same point."""
  barrier = threading.Barrier(n, timeout=60)
  slots, calls = [None] * n, [None] * n

  def meet(i, call):
    calls[i] = call
    barrier.wait()
    seen = list(calls)
    barrier.wait()
    assert len(set(seen)) == 1, f"the hosts are at different collectives: {seen}"

  def make(i):
    def gather(x):
      slots[i] = x
      meet(i, "gather")
      out = list(slots)
      barrier.wait()
      return out
    return shards.Hosts(i, n, lambda name: meet(i, name), gather)

  return [make(i) for i in range(n)]


def run_hosts(n, caches, source, teacher):
  out, errors = [None] * n, []

  def host(i, h):
    try:
      out[i] = shards.prepare(source, teacher, 32, caches[i], num_proc=1, piece_bytes=4000, hosts=h,
                              log=lambda m: None)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=host, args=(i, h)) for i, h in enumerate(fake_hosts(n))]
  [t.start() for t in threads]
  [t.join(120) for t in threads]
  assert not errors, errors
  assert not any(t.is_alive() for t in threads), "a host is still waiting"
  return out


def test_hosts_sharing_the_cache_split_the_work(tiny_teacher, tmp_path, monkeypatch):
  write_corpus(tmp_path / "c.txt", 300)
  source = str(tmp_path / "c.txt")
  single = shards.prepare(source, tiny_teacher, 32, str(tmp_path / "single"), num_proc=1, piece_bytes=4000,
                          log=lambda m: None)
  made = []
  real = shards._make_shard
  monkeypatch.setattr(shards, "_make_shard", lambda task, tok=None: made.append(
      (threading.current_thread().name, task[3])) or real(task, tok))
  shared = str(tmp_path / "shared")
  out = run_hosts(2, [shared, shared], source, tiny_teacher)
  assert out[0] == out[1] and shard_bytes(out[0]) == shard_bytes(single)
  by_host = {}
  for who, path in made:
    by_host.setdefault(who, []).append(os.path.basename(path))
  assert len(by_host) == 2 and sum(map(len, by_host.values())) == len(shard_bytes(single))  # each once
  made.clear()
  # Caches the hosts do not share (each its own disk): each host makes every shard in its own.
  out = run_hosts(2, [str(tmp_path / "h0"), str(tmp_path / "h1")], source, tiny_teacher)
  assert shard_bytes(out[0]) == shard_bytes(out[1]) == shard_bytes(single)
  assert len(made) == 2 * len(shard_bytes(single))
  # One host's cache made in an earlier run, the other's disk new: both go through preparation together
  # (before, the first returned at once and the second waited at a barrier it alone had reached); the
  # first's shards are read, not made again.
  made.clear()
  shutil.rmtree(tmp_path / "h1")
  out = run_hosts(2, [str(tmp_path / "h0"), str(tmp_path / "h1")], source, tiny_teacher)
  assert shard_bytes(out[0]) == shard_bytes(out[1]) == shard_bytes(single)
  assert {os.path.dirname(path) for _, path in made} == {out[1]}


# --- Damaged caches: made again where prepare can, refused in one line where it is read ----------------

def prepared(tiny_teacher, tmp_path, n_docs=300):
  """A corpus of several pieces, prepared: (source, cache, folder, shard bytes)."""
  write_corpus(tmp_path / "c.txt", n_docs)
  source, cache = str(tmp_path / "c.txt"), str(tmp_path / "cache")
  folder = shards.prepare(source, tiny_teacher, 32, cache, num_proc=1, piece_bytes=4000, log=lambda m: None)
  return source, cache, folder, shard_bytes(folder)


def again(source, tiny_teacher, cache, **kw):
  logs = []
  folder = shards.prepare(source, tiny_teacher, 32, cache, num_proc=1, piece_bytes=4000, log=logs.append,
                          **kw)
  return folder, logs


def manifest_of(folder):
  with open(os.path.join(folder, shards.MANIFEST)) as f:
    return json.load(f)


def test_the_manifest_records_each_shards_size_and_crc32(tiny_teacher, tmp_path):
  import zlib
  _, _, folder, want = prepared(tiny_teacher, tmp_path)
  m = manifest_of(folder)
  assert [s["name"] for s in m["shards"]] == sorted(want)
  for s in m["shards"]:
    assert s["bytes"] == len(want[s["name"]]) and s["crc32"] == f"{zlib.crc32(want[s['name']]):08x}"


def test_damaged_shards_are_made_again_each_with_a_line(tiny_teacher, tmp_path):
  source, cache, folder, want = prepared(tiny_teacher, tmp_path)
  names = sorted(want)
  path = lambda i: os.path.join(folder, names[i])
  os.truncate(path(1), len(want[names[1]]) // 2)  # torn
  flipped = bytearray(want[names[2]])
  flipped[len(flipped) // 2] ^= 1  # same size, one bit: only the checksum tells
  open(path(2), "wb").write(bytes(flipped))
  os.remove(path(3))
  before = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in names if n not in names[1:4]}
  again_folder, logs = again(source, tiny_teacher, cache)
  assert again_folder == folder
  assert [n for n in names[1:4] if any(n in l and "making it again" in l for l in logs)] == names[1:4]
  assert again(source, tiny_teacher, cache)[1] == []  # intact now: nothing said, nothing made
  assert shard_bytes(folder) == want
  assert {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in before} == before  # the rest kept


def test_damage_is_reported_one_line_per_shard(tiny_teacher, tmp_path):
  source, cache, folder, want = prepared(tiny_teacher, tmp_path)
  names = sorted(want)
  os.truncate(os.path.join(folder, names[0]), 100)
  with open(os.path.join(folder, names[1]), "r+b") as f:
    f.seek(len(want[names[1]]) // 2)
    f.write(bytes(b ^ 0xff for b in want[names[1]][len(want[names[1]]) // 2:][:8]))
  folder, logs = again(source, tiny_teacher, cache)
  said = [l for l in logs if "making it again" in l]
  assert len(said) == 2, logs
  assert names[0] in said[0] and f"is 100 bytes where the manifest says {len(want[names[0]]):,}" in said[0]
  assert names[1] in said[1] and "does not match its CRC-32" in said[1]
  assert shard_bytes(folder) == want


@pytest.mark.parametrize("text, problem", [
    ('{"format": 1, "max_len": 3', "is not valid JSON"),
    ("", "is not valid JSON"),
    ('["a"]', "is not a JSON object"),
    ('{"format": 1}', "lacks max_len"),
])
def test_a_manifest_that_does_not_parse_is_listed_again(tiny_teacher, tmp_path, monkeypatch, text,
                                                        problem):
  source, cache, folder, want = prepared(tiny_teacher, tmp_path)
  m = manifest_of(folder)
  open(os.path.join(folder, shards.MANIFEST), "w").write(text)
  with pytest.raises(shards.DamagedCache, match=f"manifest.json {problem}: delete it"):
    shards.Rows(folder)
  monkeypatch.setattr(shards, "_make_shard", lambda *a: pytest.fail("tokenised again"))
  folder, logs = again(source, tiny_teacher, cache)
  assert f"manifest.json {problem}; listing them again" in logs[0]
  assert manifest_of(folder) == m and shard_bytes(folder) == want


def test_a_manifest_missing_a_shards_field_is_listed_again(tiny_teacher, tmp_path, monkeypatch):
  source, cache, folder, want = prepared(tiny_teacher, tmp_path)
  m = manifest_of(folder)
  broken = json.loads(json.dumps(m))
  del broken["shards"][2]["rows"]
  json.dump(broken, open(os.path.join(folder, shards.MANIFEST), "w"))
  monkeypatch.setattr(shards, "_make_shard", lambda *a: pytest.fail("tokenised again"))
  folder, logs = again(source, tiny_teacher, cache)
  assert "lacks shards[2].rows; listing them again" in logs[0]
  assert manifest_of(folder) == m


def test_a_manifest_from_an_earlier_version_is_read_through_and_listed_again(tiny_teacher, tmp_path,
                                                                            monkeypatch):
  source, cache, folder, want = prepared(tiny_teacher, tmp_path)
  m = manifest_of(folder)
  old = json.loads(json.dumps(m))
  for s in old["shards"]:
    del s["bytes"], s["crc32"]
  json.dump(old, open(os.path.join(folder, shards.MANIFEST), "w"))
  assert len(shards.Rows(folder)) == m["rows"]  # read as it is: nothing recorded to check
  monkeypatch.setattr(shards, "_make_shard", lambda *a: pytest.fail("tokenised again"))
  folder, logs = again(source, tiny_teacher, cache)
  assert len(logs) == 2 and "listed by an earlier minilm_jax, without sizes and checksums" in logs[0], logs
  assert manifest_of(folder) == m


def test_a_shard_found_without_a_manifest_must_read_through(tiny_teacher, tmp_path):
  # A killed preparation leaves whole shards and no manifest; a shard torn since is made again.
  source, cache, folder, want = prepared(tiny_teacher, tmp_path)
  names = sorted(want)
  os.remove(os.path.join(folder, shards.MANIFEST))
  with pytest.raises(FileNotFoundError, match="an unfinished preparation"):
    shards.Rows(folder)
  os.truncate(os.path.join(folder, names[4]), len(want[names[4]]) - 10)
  folder, logs = again(source, tiny_teacher, cache)
  assert any(names[4] in l and "is unreadable" in l and "making it again" in l for l in logs), logs
  assert shard_bytes(folder) == want


def test_rows_refuses_a_shard_of_another_size_naming_it(tiny_teacher, tmp_path):
  _, _, folder, want = prepared(tiny_teacher, tmp_path)
  name = sorted(want)[3]
  with open(os.path.join(folder, name), "ab") as f:
    f.write(b"more")
  with pytest.raises(shards.DamagedCache) as e:
    shards.Rows(folder)
  msg = str(e.value)
  assert len(msg.splitlines()) == 1
  assert os.path.join(folder, name) in msg and "where the manifest says" in msg and "delete it" in msg


def test_a_remote_shard_is_checked_as_it_is_copied(tiny_teacher, tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  _, _, folder, want = prepared(tiny_teacher, tmp_path)
  names = sorted(want)
  local = shards._local_copy(folder)
  # A local copy of another size (a disk fault): copied again from the bucket.
  os.truncate(os.path.join(local, names[0]), 10)
  assert shards._local_copy(folder) == local and shard_bytes(local) == want
  # The bucket's own shard damaged, the size the same: the fresh copy fails its CRC-32, refused.
  os.remove(os.path.join(local, names[1]))
  with open(os.path.join(folder, names[1]), "r+b") as f:
    f.seek(len(want[names[1]]) // 2)
    f.write(b"\xa5" * 4)
  with pytest.raises(shards.DamagedCache, match=f"{names[1]} does not match its CRC-32 .* delete it"):
    shards._local_copy(folder)
  assert not [f for f in os.listdir(local) if ".tmp-" in f] and names[1] not in os.listdir(local)


def test_hosts_agree_to_make_damaged_shards_again(tiny_teacher, tmp_path):
  write_corpus(tmp_path / "c.txt", 300)
  source, shared = str(tmp_path / "c.txt"), str(tmp_path / "shared")
  (folder, _) = run_hosts(2, [shared, shared], source, tiny_teacher)
  want = shard_bytes(folder)
  os.truncate(os.path.join(folder, sorted(want)[2]), 7)
  out = run_hosts(2, [shared, shared], source, tiny_teacher)
  assert out == [folder, folder] and shard_bytes(folder) == want


PREPARE_TWO = ("import sys; from minilm_jax import shards; "
               "shards.prepare(sys.argv[1], sys.argv[2], 32, sys.argv[3], num_proc=2, piece_bytes=12 << 20)")


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
  """Two pieces of 12 MB: each worker tokenises one for ~10 s, far longer than the test waits for it."""
  path = tmp_path_factory.mktemp("long") / "c.txt"
  block = "\n\n".join(write_corpus(path, 2000, seed=3)) + "\n\n"
  with open(path, "w") as f:
    for _ in range((24 << 20) // len(block) + 1):
      f.write(block)
  return str(path)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_interrupting_tokenisation_leaves_no_worker_behind(tiny_teacher, long_corpus, tmp_path, how):
  psutil = pytest.importorskip("psutil")
  env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  cache = tmp_path / "cache"
  # A session of its own: Ctrl-C goes to the terminal's whole process group, as here.
  p = subprocess.Popen([sys.executable, "-c", PREPARE_TWO, long_corpus, tiny_teacher, str(cache)],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
  children = []
  try:
    reading = lambda c: any(f.path == long_corpus for f in c.open_files())
    deadline = time.time() + 120
    while time.time() < deadline and sum(map(reading, children)) < 2:  # both workers tokenising
      assert p.poll() is None, p.stderr.read().decode()[-2000:]
      time.sleep(0.05)
      try:
        children = psutil.Process(p.pid).children(recursive=True)
        sum(map(reading, children))
      except psutil.Error:  # one just started or ended
        children = []
    assert sum(map(reading, children)) == 2, children
    {"ctrl-c": lambda: os.killpg(p.pid, signal.SIGINT), "sigterm": lambda: p.send_signal(signal.SIGTERM),
     "sigkill": lambda: p.send_signal(signal.SIGKILL)}[how]()
    p.wait(30)
    # Gone at once, not when their pieces are done (~10 s): a worker left alone tokenises on.
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [(c.pid, c.cmdline()) for c in alive]
  finally:  # never leave a process behind, the test failing or not
    for proc in [p, *children]:
      try:
        proc.kill()
      except (OSError, psutil.Error):
        pass
  assert "PoolWorker" not in p.stderr.read().decode()  # Ctrl-C: the workers ignore it, print nothing
  (folder,) = glob.glob(str(cache / "*"))
  assert not os.path.exists(os.path.join(folder, shards.MANIFEST))
  for name in os.listdir(folder):  # whole shards, or a worker's temporary the next run removes
    assert ".tmp-" in name or shards._unreadable(os.path.join(folder, name)) is None, name
