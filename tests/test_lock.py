"""One writer per workdir: the local flock, the gs:// lease (against a strict in-memory object store), and
the hosts of a multi-host run."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from minilm_jax import lock
from test_shards import fake_hosts

HOLD = ("import sys, time; from minilm_jax import lock; l = lock.acquire(sys.argv[1], log=print); "
        "print('held', flush=True); time.sleep(600)")


def hold_in_another_process(workdir):
  """A live holder (another run, as far as the lock can tell): returns its Popen once it holds it."""
  p = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "held"
  return p


def tree(folder):
  """Every path under `folder` with its size and mtime: what a refused run must leave as it was."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      st = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
  st = os.stat(folder)
  out["."] = (st.st_size, st.st_mtime_ns)
  return out


# --- Local workdirs: flock ------------------------------------------------------------------------------

def test_a_second_taker_is_refused_naming_the_holder(tmp_path):
  w = str(tmp_path / "w")
  logs = []
  with lock.acquire(w, log=logs.append):
    record = json.load(open(os.path.join(w, lock.NAME)))
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    with pytest.raises(lock.WorkdirLocked) as e:
      lock.acquire(w)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert f"workdir {w} is in use by host {socket.gethostname()} pid {os.getpid()}" in msg
  assert logs == []  # a fresh workdir: nothing to take over
  assert open(os.path.join(w, lock.NAME)).read() == ""  # released cleanly
  with lock.acquire(w, log=logs.append):
    pass
  assert logs == []  # a clean release is no stale lock


def test_a_refused_taker_changes_nothing(tmp_path):
  w = tmp_path / "w"
  (w / "checkpoints" / "3").mkdir(parents=True)
  (w / "metrics.jsonl").write_text('{"step": 3}\n')
  holder = hold_in_another_process(w)
  try:
    time.sleep(0.05)  # mtimes have a resolution
    before = tree(w)
    with pytest.raises(lock.WorkdirLocked, match=f"pid {holder.pid}"):
      lock.acquire(str(w))
    assert tree(w) == before
  finally:
    holder.kill()
    holder.wait()


def test_a_killed_holders_lock_is_taken_over_with_a_line(tmp_path):
  w = str(tmp_path / "w")
  holder = hold_in_another_process(w)
  with pytest.raises(lock.WorkdirLocked, match=f"pid {holder.pid} "):
    lock.acquire(w)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  logs = []
  with lock.acquire(w, log=logs.append):
    assert json.load(open(os.path.join(w, lock.NAME)))["pid"] == os.getpid()
  assert len(logs) == 1
  assert logs[0].startswith(f"taking over a stale lock on {w} left by host {socket.gethostname()} "
                            f"pid {holder.pid} (started ")


def test_a_process_the_holder_started_does_not_keep_its_lock(tmp_path):
  # The lock file is opened close-on-exec: a child that outlives the run (a tokeniser, say) holds nothing.
  w = str(tmp_path / "w")
  script = ("import subprocess, sys, time; from minilm_jax import lock; lock.acquire(sys.argv[1]); "
            "c = subprocess.Popen(['sleep', '60']); print(c.pid, flush=True); time.sleep(600)")
  p = subprocess.Popen([sys.executable, "-c", script, w], stdout=subprocess.PIPE, text=True)
  child = int(p.stdout.readline())
  try:
    p.kill()
    p.wait()
    with lock.acquire(w, log=lambda m: None):
      pass
  finally:
    os.kill(child, signal.SIGKILL)


def test_a_workdir_that_cannot_be_made_is_an_oserror(tmp_path):
  (tmp_path / "file").write_text("precious")
  with pytest.raises(OSError, match="is not writable"):
    lock.acquire(str(tmp_path / "file" / "w"))
  assert (tmp_path / "file").read_text() == "precious"


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
  import fcntl
  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_locks)
  logs = []
  with lock.acquire(str(tmp_path / "w"), log=logs.append) as held:
    held.check()
  assert len(logs) == 1 and "cannot lock" in logs[0] and "No locks available" in logs[0]


def test_hosts_process_0_holds_it_and_every_host_hears(tmp_path):
  w = str(tmp_path / "w")
  out, errors = [None] * 2, [None] * 2

  def host(i, h):
    try:
      out[i] = lock.acquire(w, h, log=lambda m: None)
    except Exception as e:  # pylint: disable=broad-except
      errors[i] = e

  def both():
    threads = [threading.Thread(target=host, args=(i, h)) for i, h in enumerate(fake_hosts(2))]
    [t.start() for t in threads]
    [t.join(30) for t in threads]

  both()
  assert errors == [None, None]
  assert json.load(open(os.path.join(w, lock.NAME)))["pid"] == os.getpid()  # one lock: process 0's
  out[1].release()
  with pytest.raises(lock.WorkdirLocked):  # process 1's release gave nothing up
    lock.acquire(w)
  out[0].release()
  # Another run holds it: process 0 is refused, and process 1 stops with it rather than go on alone.
  with lock.acquire(w):
    both()
  assert isinstance(errors[0], lock.WorkdirLocked) and "in use by" in str(errors[0])
  assert isinstance(errors[1], lock.WorkdirLocked) and "process 0 did not get its lock" in str(errors[1])


def test_an_unknown_scheme_warns_and_runs(monkeypatch):
  logs = []
  with lock.acquire("s3://bucket/run", log=logs.append):
    pass
  assert len(logs) == 1 and "no lock for s3:// workdirs" in logs[0]


# --- gs:// workdirs: a leased object --------------------------------------------------------------------

class StoreError(Exception):
  """What google.api_core raises: an HTTP status in .code (PreconditionFailed 412, NotFound 404)."""

  def __init__(self, code):
    super().__init__(f"HTTP {code}")
    self.code = code


class FakeBucket:
  """An in-memory bucket that keeps GCS's rules for objects: each write makes a new generation, and a
  write or delete conditioned on a generation (0: no object) that is not the current one fails with 412.
  Stricter than GCS on purpose: an unconditional write or delete fails the test, since the lock must
  never make one."""

  def __init__(self):
    self.objects = {}  # name -> (bytes, generation)
    self.generation = 1000
    self.writes = 0

  def blob(self, name):
    return FakeBlob(self, name)

  def get_blob(self, name):
    if name not in self.objects:
      return None
    b = FakeBlob(self, name)
    b.generation = self.objects[name][1]
    return b

  def put(self, name, record):
    """Write as another run would (unconditionally: the test's own hand)."""
    self.generation += 1
    self.objects[name] = (json.dumps(record).encode(), self.generation)

  def record(self, name=".lock"):
    return json.loads(self.objects[name][0])


class FakeBlob:
  def __init__(self, bucket, name):
    self.bucket, self.name, self.generation = bucket, name, None

  def _current(self):
    return self.bucket.objects.get(self.name, (None, 0))[1]

  def upload_from_string(self, data, content_type=None, if_generation_match=None):
    assert if_generation_match is not None, "an unconditional write"
    if self._current() != if_generation_match:
      raise StoreError(412)
    self.bucket.generation += 1
    self.bucket.writes += 1
    self.bucket.objects[self.name] = (data.encode() if isinstance(data, str) else data,
                                      self.bucket.generation)
    self.generation = self.bucket.generation

  def download_as_bytes(self, if_generation_match=None):
    if self.name not in self.bucket.objects:
      raise StoreError(404)
    if if_generation_match is not None and self._current() != if_generation_match:
      raise StoreError(412)
    return self.bucket.objects[self.name][0]

  def delete(self, if_generation_match=None):
    assert if_generation_match is not None, "an unconditional delete"
    if self.name not in self.bucket.objects:
      raise StoreError(404)
    if self._current() != if_generation_match:
      raise StoreError(412)
    del self.bucket.objects[self.name]


def test_the_fake_store_keeps_generation_preconditions():
  b = FakeBucket()
  b.blob("x").upload_from_string("a", if_generation_match=0)
  g = b.get_blob("x").generation
  with pytest.raises(StoreError) as e:
    b.blob("x").upload_from_string("b", if_generation_match=0)  # exists
  assert e.value.code == 412
  with pytest.raises(StoreError):
    b.blob("x").upload_from_string("b", if_generation_match=g - 1)
  with pytest.raises(StoreError):
    b.blob("x").delete(if_generation_match=g + 1)
  b.blob("x").upload_from_string("b", if_generation_match=g)
  assert b.get_blob("x").generation > g and b.get_blob("x").download_as_bytes() == b"b"
  with pytest.raises(AssertionError):
    b.blob("x").upload_from_string("c")


class Clock:
  def __init__(self, t=1_000_000.0):
    self.t = t

  def __call__(self):
    return self.t


URL = "gs://bucket/runs/demo"
OBJECT = "runs/demo/.lock"


def take(bucket, clock, logs=None, **kw):
  return lock._lock_object(URL, bucket, (logs if logs is not None else []).append, clock=clock,
                           lease_s=300, renew_s=30, renewing=False, **kw)


def lease_of(held):
  return held._release.__self__  # the _Lease behind a held gs:// lock


def test_gs_lock_is_created_once_and_refuses_a_second_run():
  b, clock = FakeBucket(), Clock()
  held = take(b, clock)
  record = b.record(OBJECT)
  assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
  assert record["renewed"] == clock.t and record["lease_s"] == 300
  clock.t += 250  # not renewed, but the lease still runs
  with pytest.raises(lock.WorkdirLocked) as e:
    take(b, clock)
  assert f"workdir {URL} is in use by host {socket.gethostname()} pid {os.getpid()}" in str(e.value)
  assert b.record(OBJECT) == record  # the refused run wrote nothing
  held.release()
  assert OBJECT not in b.objects
  take(b, clock).release()


def test_gs_lease_is_renewed_on_its_own_generation_and_outlives_its_first_term():
  b, clock = FakeBucket(), Clock()
  held = take(b, clock)
  lease = lease_of(held)
  for _ in range(20):  # 20 renewals 30 s apart: 600 s, twice the lease
    clock.t += 30
    lease.renew()
    held.check()
  assert b.record(OBJECT)["renewed"] == clock.t and b.writes == 21
  with pytest.raises(lock.WorkdirLocked):
    take(b, clock)
  held.release()


def test_gs_expired_lease_is_taken_over_and_the_old_holder_stops():
  b, clock = FakeBucket(), Clock()
  old = take(b, clock)
  clock.t += 301
  logs = []
  new = take(b, clock, logs)
  assert len(logs) == 1
  assert logs[0].startswith(f"taking over a stale lock on {URL} left by host {socket.gethostname()} pid "
                            f"{os.getpid()}") and "its lease ran out 1 s ago" in logs[0]
  mine = b.record(OBJECT)
  # The old holder had given up already (301 s without a renewal), and stays stopped.
  with pytest.raises(lock.LeaseLost, match="not renewed for 301 s"):
    old.check()
  lease_of(old).renew()
  with pytest.raises(lock.LeaseLost):
    old.check()
  old.release()  # not ours any more: nothing deleted
  assert b.record(OBJECT) == mine
  new.check()
  new.release()
  assert OBJECT not in b.objects


def test_gs_holder_whose_lease_was_taken_over_stops_at_its_next_renewal():
  # Its clock 2 minutes behind the taker's: it still counts its lease as running, but the taker does not.
  b, behind = FakeBucket(), Clock()
  old = take(b, behind)
  behind.t += 200
  new = take(b, Clock(behind.t + 120), [])
  old.check()  # nothing known yet
  behind.t += 30
  lease_of(old).renew()  # refused: the object has another generation
  with pytest.raises(lock.LeaseLost, match=f"taken over by host {socket.gethostname()} pid {os.getpid()}"):
    old.check()
  old.release()
  new.check()
  new.release()
  assert OBJECT not in b.objects


def test_gs_holder_that_cannot_renew_gives_up_before_its_lease_runs_out(monkeypatch):
  b, clock = FakeBucket(), Clock()
  held = take(b, clock)
  real = FakeBlob.upload_from_string
  monkeypatch.setattr(FakeBlob, "upload_from_string", lambda *a, **k: (_ for _ in ()).throw(
      ConnectionError("the network")))
  for _ in range(7):
    clock.t += 30
    lease_of(held).renew()  # fails quietly: the next may go through
  held.check()  # 210 s: still within lease - 2 renewals
  clock.t += 31
  with pytest.raises(lock.LeaseLost, match="not renewed for 241 s"):
    held.check()
  monkeypatch.setattr(FakeBlob, "upload_from_string", real)
  lease_of(held).renew()  # too late: a lost lease is not taken back
  with pytest.raises(lock.LeaseLost):
    held.check()


def test_gs_two_runs_taking_over_one_stale_lock_one_wins(monkeypatch):
  b, clock = FakeBucket(), Clock()
  take(b, clock)  # a holder that dies without releasing
  clock.t += 400
  winner, writes = [], []
  real = FakeBlob.upload_from_string

  def racing(self, data, content_type=None, if_generation_match=None):
    writes.append(if_generation_match)
    if len(writes) == 2:  # run A's takeover, on the generation it read: run B's lands first
      winner.append(take(b, clock))
    return real(self, data, content_type, if_generation_match)

  monkeypatch.setattr(FakeBlob, "upload_from_string", racing)
  with pytest.raises(lock.WorkdirLocked, match="is in use by"):
    take(b, clock)  # run A: its takeover refused, it reads B's live lock
  monkeypatch.undo()
  assert len(winner) == 1 and writes[1] == writes[3] != 0  # both took over from the same generation
  assert b.record(OBJECT)["token"] == lease_of(winner[0]).record["token"]
  winner[0].check()


def test_gs_a_write_whose_answer_was_lost_is_ours(monkeypatch):
  # The client retries a conditional upload whose answer it lost: the retry fails (the object is there,
  # in a newer generation), and the object is our own.
  b, clock = FakeBucket(), Clock()
  real = FakeBlob.upload_from_string

  def lost_answer(self, data, content_type=None, if_generation_match=None):
    real(self, data, content_type, if_generation_match)
    raise StoreError(412)

  monkeypatch.setattr(FakeBlob, "upload_from_string", lost_answer)
  held = take(b, clock)
  clock.t += 30
  lease_of(held).renew()  # the renewal's answer lost as well
  monkeypatch.undo()
  held.check()
  assert lease_of(held).generation == b.objects[OBJECT][1]
  lease_of(held).renew()
  held.check()
  held.release()
  assert OBJECT not in b.objects


def test_gs_a_holder_gone_from_this_machine_is_taken_over_before_its_lease_ends():
  b, clock = FakeBucket(), Clock()
  p = subprocess.Popen(["true"])
  p.wait()  # a pid that is free now
  b.put(OBJECT, {**lock._record(token="x", machine=lock._machine(), renewed=clock.t, lease_s=300),
                 "pid": p.pid})
  logs = []
  take(b, clock, logs).release()
  assert "its process is gone" in logs[0]
  # The same record from another machine (or pid namespace): only its lease can tell.
  b.put(OBJECT, {**lock._record(token="x", machine="another", renewed=clock.t, lease_s=300),
                 "pid": p.pid})
  with pytest.raises(lock.WorkdirLocked):
    take(b, clock)


def test_gs_an_unreadable_lock_object_is_taken_over():
  b, clock = FakeBucket(), Clock()
  b.objects[OBJECT] = (b"{torn", 5)
  logs = []
  take(b, clock, logs).release()
  assert "its record unreadable" in logs[0]


def test_gs_deleted_lock_object_is_lost():
  b, clock = FakeBucket(), Clock()
  held = take(b, clock)
  del b.objects[OBJECT]  # somebody removed it by hand
  clock.t += 30
  lease_of(held).renew()
  with pytest.raises(lock.LeaseLost, match="it was deleted"):
    held.check()


def test_gs_lease_thread_renews_until_released():
  b = FakeBucket()
  held = lock._lock_object(URL, b, lambda m: None, lease_s=30, renew_s=0.02)
  first = b.objects[OBJECT][1]
  deadline = time.time() + 10
  while b.writes < 4 and time.time() < deadline:
    time.sleep(0.01)
  assert b.writes >= 4 and b.objects[OBJECT][1] > first
  held.check()
  held.release()
  assert OBJECT not in b.objects
  writes = b.writes
  time.sleep(0.1)
  assert b.writes == writes  # the thread stopped with the release


def test_gs_workdirs_go_through_google_cloud_storage(monkeypatch):
  b = FakeBucket()
  monkeypatch.setattr(lock, "_bucket", lambda url: b)
  with lock.acquire("gs://bucket/runs/demo/", log=lambda m: None):
    assert OBJECT in b.objects
  assert OBJECT not in b.objects
  assert lock._object_name("gs://bucket") == ".lock"


def test_gs_without_google_cloud_storage_is_a_one_line_import_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "google.cloud", None)
  with pytest.raises(ImportError, match="pip install google-cloud-storage"):
    lock.acquire("gs://bucket/run")


def test_a_lost_lease_stops_every_host_together():
  b, clock = FakeBucket(), Clock()
  held = take(b, clock)
  hosts = fake_hosts(2)
  locks = [lock.Lock(URL, held._release, held._lost, hosts[0]), lock.Lock(URL, hosts=hosts[1])]
  clock.t += 300
  errors = [None, None]

  def check(i):
    try:
      locks[i].check()
    except lock.LeaseLost as e:
      errors[i] = e

  threads = [threading.Thread(target=check, args=(i,)) for i in range(2)]
  [t.start() for t in threads]
  [t.join(30) for t in threads]
  assert "not renewed for 300 s" in str(errors[0]) and "process 0 lost it" in str(errors[1])
