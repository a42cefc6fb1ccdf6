"""One writer per workdir: the lock a run takes before it writes anything there.

A local workdir's lock is WORKDIR/.lock, held with flock(LOCK_EX | LOCK_NB) for the whole run. The kernel
drops an flock when its holder exits, however it exits, so the flock is the truth: the file's JSON (host,
pid, started) only names the holder, and a file that still names a run once its flock is gone is a stale
lock, taken over with a line saying so. The file is never deleted (two runs could then hold flocks on two
files of one name); a clean release empties it.

A gs:// workdir's lock is the object WORKDIR/.lock, whose JSON adds a lease: it is created only where
there is none (if_generation_match=0), and a thread renews it every RENEW_S seconds, each write
conditioned on the generation the holder wrote last, so the first write by anybody else makes the
holder's next renewal fail. Another run takes a lock over once its lease has run out (or, on the same
machine, once its process is gone) by a write conditioned on the generation it read: of two runs
taking it over, one wins. A holder whose renewal was refused, or that has not renewed for LEASE_S -
2 * RENEW_S seconds, has lost the lock: `check()` raises LeaseLost, and the trainer checks before each
checkpoint.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

NAME = ".lock"
LEASE_S = 300.0  # a killed holder's gs:// lock is taken over this long after its last renewal
RENEW_S = 30.0   # the holder gives up after LEASE_S - 2 * RENEW_S without one: a minute for clock skew


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir's lock."""


class LeaseLost(RuntimeError):
  """This run's lease on a gs:// workdir was taken over or ran out: it must not write there again."""


class Lock:
  """A held workdir lock. `release()` (or leaving the with block) gives it up; `check()` raises LeaseLost
  once it is lost (only a gs:// lease can be). With `hosts` (shards.Hosts), process 0 holds it and
  check() is a collective: every process raises together."""

  def __init__(self, workdir: str, release: Callable[[], None] = lambda: None,
               lost: Callable[[], Optional[str]] = lambda: None, hosts=None):
    self.workdir, self._release, self._lost, self._hosts = workdir, release, lost, hosts

  def check(self) -> None:
    why = self._lost()
    if self._hosts is not None and self._hosts.gather(int(why is not None))[0] and why is None:
      why = "process 0 lost it"
    if why:
      raise LeaseLost(f"lost the lock on workdir {self.workdir} ({why}); stopped before writing there "
                      "again: check which run is writing to it")

  def release(self) -> None:
    release, self._release = self._release, lambda: None
    release()

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(workdir: str, hosts=None, log: Callable[[str], None] = print) -> Lock:
  """Take `workdir`'s lock (creating the folder if needed, and nothing else), or raise WorkdirLocked
  naming the run that holds it. With `hosts`, every process calls this and process 0 takes the lock."""
  if hosts is None:
    return _take(workdir, log)
  # Process 0 writes the metrics, events and export and coordinates Orbax's saves; on a shared disk the
  # others would be refused by its own lock. Every process learns whether it got it before any writes,
  # so a refused run stops everywhere.
  lock, error = None, None
  if hosts.index == 0:
    try:
      lock = _take(workdir, log)
    except Exception as e:  # pylint: disable=broad-except  (re-raised below, after the others hear)
      error = e
  held = hosts.gather(int(error is None))[0]
  if error is not None:
    raise error
  if not held:
    raise WorkdirLocked(f"workdir {workdir}: process 0 did not get its lock (its error says why)")
  return Lock(workdir, lock._release, lock._lost, hosts) if lock else Lock(workdir, hosts=hosts)


def _take(workdir: str, log: Callable[[str], None]) -> Lock:
  if workdir.startswith("gs://"):
    return _lock_object(workdir, _bucket(workdir), log)
  if "://" in workdir:
    log(f"warning: no lock for {workdir.split('://')[0]}:// workdirs: nothing stops another run from "
        f"writing to {workdir}")
    return Lock(workdir)
  return _lock_file(workdir, log)


def _record(**extra) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **extra}


def _parse(data: bytes) -> Optional[dict]:
  """The holder's record; None for an empty one (released cleanly), {} for one that does not parse."""
  if not data.strip():
    return None
  try:
    record = json.loads(data)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def _who(record: Optional[dict]) -> str:
  if not record:
    return "another run (its record unreadable or not yet written)"
  return f"host {record.get('host')} pid {record.get('pid')} (started {record.get('started')})"


def _in_use(workdir: str, record: Optional[dict]) -> str:
  return (f"workdir {workdir} is in use by {_who(record)}: wait for that run to end or stop it "
          f"(lock: {workdir.rstrip('/')}/{NAME})")


# --- Local: flock ---------------------------------------------------------------------------------------

def _lock_file(workdir: str, log: Callable[[str], None]) -> Lock:
  import fcntl
  path = os.path.join(workdir, NAME)
  try:
    os.makedirs(workdir, exist_ok=True)
    # Close-on-exec (as Python opens files anyway): a process we start must not inherit the flock and
    # keep holding it after we are gone.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise OSError(f"workdir {workdir} is not writable ({e.strerror or e})") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    record = _parse(os.pread(fd, 1 << 16, 0))
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
      raise WorkdirLocked(_in_use(workdir, record)) from None
    # A file system without locks (some network ones): say so, and run as before.
    log(f"warning: cannot lock {path} ({e.strerror}): nothing stops another run from writing to "
        f"{workdir}")
    return Lock(workdir)
  stale = _parse(os.pread(fd, 1 << 16, 0))
  if stale is not None:
    log(f"taking over a stale lock on {workdir} left by {_who(stale)}, which is gone")
  data = json.dumps(_record()).encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)

  def release():
    try:
      os.ftruncate(fd, 0)  # a clean end: the next run has nothing to take over
    except OSError:
      pass  # a full or vanished disk: the next run only says it takes the lock over
    os.close(fd)  # drops the flock

  return Lock(workdir, release)


# --- gs://: a leased object -----------------------------------------------------------------------------

def _bucket(url: str):
  """The google-cloud-storage bucket of a gs:// URL."""
  try:
    from google.cloud import storage
  except ImportError:
    raise ImportError("a gs:// workdir is locked through google-cloud-storage: pip install "
                      "google-cloud-storage (or minilm-jax[gcs])") from None
  return storage.Client().bucket(url[len("gs://"):].split("/", 1)[0])


def _status(e: BaseException) -> Optional[int]:
  """The HTTP status of a google.api_core error (PreconditionFailed: 412, NotFound: 404), else None."""
  code = getattr(e, "code", None)
  return int(code) if isinstance(code, int) else None


def _object_name(url: str) -> str:
  path = url[len("gs://"):].split("/", 1)
  return f"{path[1].strip('/')}/{NAME}" if len(path) > 1 and path[1].strip("/") else NAME


def _machine() -> Optional[str]:
  """This boot and pid namespace: where a pid in a record can be checked with kill(pid, 0). None where
  unknown (then only the lease says a holder is gone)."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f"{f.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"
  except OSError:
    return None


def _gone(record: dict) -> bool:
  """Whether the holder's process is known to be gone: it ran on this machine, and its pid is free."""
  if record.get("machine") is None or record.get("machine") != _machine():
    return False
  try:
    os.kill(int(record["pid"]), 0)
  except ProcessLookupError:
    return True
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return False


def _stale(record: dict, now: float) -> Optional[str]:
  """Why a lock object's holder no longer holds it, or None while it does."""
  if not record:
    return "its record unreadable"
  try:
    expired = now > float(record["renewed"]) + float(record["lease_s"])
  except (KeyError, TypeError, ValueError):
    return "its record unreadable"
  if expired:
    return f"its lease ran out {now - float(record['renewed']) - float(record['lease_s']):.0f} s ago"
  if _gone(record):
    return "its process is gone"
  return None


def _read(bucket, name: str):
  """(record, generation) of the lock object, or None if there is none."""
  for _ in range(5):  # it may change between the metadata read and the download: read again
    blob = bucket.get_blob(name)
    if blob is None:
      return None
    try:
      return _parse(blob.download_as_bytes(if_generation_match=blob.generation)) or {}, blob.generation
    except Exception as e:  # pylint: disable=broad-except
      if _status(e) not in (404, 412):
        raise
  raise WorkdirLocked(f"the lock object {name} keeps changing: another run is taking it")


def _write(bucket, name: str, record: dict, generation: int) -> Optional[int]:
  """Write the record where the object's generation is `generation` (0: where there is none); returns
  the new generation, or None when the precondition failed (somebody else wrote or deleted it)."""
  blob = bucket.blob(name)
  try:
    blob.upload_from_string(json.dumps(record), content_type="application/json",
                            if_generation_match=generation)
  except Exception as e:  # pylint: disable=broad-except
    if _status(e) in (404, 412):
      return None
    raise
  return blob.generation


class _Lease:
  """The lock object as held: renew() rewrites it on the generation last written; lost() says why it is
  no longer ours, or None."""

  def __init__(self, bucket, name: str, record: dict, generation: int, clock, renew_s: float):
    self.bucket, self.name, self.record, self.generation = bucket, name, record, generation
    self.clock, self.renew_s = clock, renew_s
    self.renewed = record["renewed"]
    self.why: Optional[str] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def lost(self) -> Optional[str]:
    if self.why is None and self.clock() - self.renewed > self.record["lease_s"] - 2 * self.renew_s:
      self.why = f"not renewed for {self.clock() - self.renewed:.0f} s"
    return self.why

  def renew(self) -> None:
    if self.lost():
      return
    now = self.clock()
    record = {**self.record, "renewed": now}
    try:
      generation = _write(self.bucket, self.name, record, self.generation)
    except Exception:  # pylint: disable=broad-except  (the network: try again at the next interval)
      return
    if generation is None:
      current = _read(self.bucket, self.name)
      if current is not None and current[0].get("token") == self.record["token"]:
        self.generation = current[1]  # our own write, retried after its answer was lost
        self.renewed = float(current[0].get("renewed", self.renewed))
      else:
        self.why = f"taken over by {_who(current[0]) if current else 'nobody: it was deleted'}"
      return
    self.generation, self.renewed = generation, now

  def start(self) -> None:
    def loop():
      while not self._stop.wait(self.renew_s) and not self.lost():
        self.renew()
    self._thread = threading.Thread(target=loop, name="minilm-lock-lease", daemon=True)
    self._thread.start()

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)
    if self.why is not None:
      return  # not ours to delete
    try:
      self.bucket.blob(self.name).delete(if_generation_match=self.generation)
    except Exception:  # pylint: disable=broad-except
      pass  # taken over (412), gone (404) or unreachable: the lease runs out by itself


def _lock_object(url: str, bucket, log: Callable[[str], None], clock=time.time, lease_s: float = LEASE_S,
                 renew_s: float = RENEW_S, renewing: bool = True) -> Lock:
  """Take the lock object of a gs:// workdir: create it, or take over a stale one. renewing=False leaves
  the renewals to the caller (tests)."""
  name = _object_name(url)
  record = _record(token=uuid.uuid4().hex, machine=_machine(), renewed=clock(), lease_s=lease_s)
  for _ in range(10):  # every failed precondition is another run's write: look again
    generation = _write(bucket, name, record, 0)
    if generation is not None:
      break
    current = _read(bucket, name)
    if current is None:
      continue  # released in between
    holder, generation = current
    if holder.get("token") == record["token"]:
      break  # our create went through; its answer was lost and the retry refused
    why = _stale(holder, clock())
    if why is None:
      raise WorkdirLocked(_in_use(url, holder))
    new = _write(bucket, name, record, generation)
    if new is not None:
      log(f"taking over a stale lock on {url} left by {_who(holder)}: {why}")
      generation = new
      break
  else:
    raise WorkdirLocked(f"workdir {url}: its lock object keeps changing: another run is taking it")
  lease = _Lease(bucket, name, record, generation, clock, renew_s)
  if renewing:
    lease.start()
  return Lock(url, lease.release, lease.lost)
