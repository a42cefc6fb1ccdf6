"""A run's workdir: its layout as named paths, local or remote (gs://), and the local mirror of a remote one.

  WORKDIR/checkpoints/   Orbax checkpoints (written straight to a remote workdir)
  WORKDIR/metrics.jsonl  one JSON line per logged step
  WORKDIR/tb/            TensorBoard events
  WORKDIR/student/       the exported student (HF, Flax and sentence-transformers folder, model card)
  WORKDIR/loss.png       the loss curve (loss_chain.png for a teaching-assistant chain)
  WORKDIR/assistant/     the teaching assistant's own run, laid out the same way
  WORKDIR/eval/          what minilm-eval writes for this run by default
  WORKDIR/cache/         the token shards (shards.py), unless data.cache_dir puts them elsewhere

For a remote workdir, the checkpoints and the shards are written there directly, and everything else to a
local mirror (`local_dir`) that is copied up at every checkpoint and at the end (`sync`). The trainer, the
evaluation and `hf.load_student` all take their paths from here.
"""

from __future__ import annotations

import json
import os

import jax

from minilm_jax import remote

CHECKPOINTS, METRICS, EVENTS, STUDENT = "checkpoints", "metrics.jsonl", "tb", "student"
LOSS_PLOT, CHAIN_PLOT, ASSISTANT, EVAL, TOKEN_CACHE = "loss.png", "loss_chain.png", "assistant", "eval", "cache"


def is_remote(path: str) -> bool:
  return "://" in path


def join(workdir: str, *names: str) -> str:
  """WORKDIR/name/...: os.path for a local workdir, '/' for a remote one (gs://bucket/run/student)."""
  if is_remote(workdir):
    return "/".join([workdir.rstrip("/"), *names])
  return os.path.join(workdir, *names)


def eval_dir(workdir: str) -> str:
  """Where minilm-eval writes a run's results by default: WORKDIR/eval, or for a remote workdir its
  local mirror's (an evaluation never writes to a bucket it reads)."""
  return os.path.join(local_dir(workdir), EVAL)


def local_student(workdir: str) -> str:
  """A local folder holding the run's exported student (for a remote workdir, a cached copy)."""
  return remote.resolve(join(workdir, STUDENT))


def exists(path: str) -> bool:
  if is_remote(path):
    from etils import epath
    return epath.Path(path).exists()
  return os.path.exists(path)


def check_writable(workdir: str) -> None:
  """Create the workdir if needed and prove it takes a file: an OSError naming it, before any work."""
  from etils import epath
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe = epath.Path(workdir) / f".write-probe-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise OSError(f"workdir {workdir} is not writable ({e.strerror or e})") from None


def local_dir(workdir: str) -> str:
  """Where metrics, TensorBoard events and the export are written: the workdir itself,
  or for a remote (gs://) workdir a local mirror that is copied up at every checkpoint and at the end
  (Orbax writes the checkpoints straight to the remote workdir)."""
  return remote.cache_dir("runs", workdir) if is_remote(workdir) else workdir


def sync(workdir: str, local: str, names, down: bool = False) -> None:
  """Copy files/folders `names` between the local mirror and a remote workdir (process 0 only)."""
  if not is_remote(workdir) or jax.process_index() != 0:
    return
  from etils import epath
  for name in names:
    src, dst = (epath.Path(workdir) / name, epath.Path(local) / name) if down else \
        (epath.Path(local) / name, epath.Path(workdir) / name)
    if src.exists():
      remote.copy_tree(src, dst)


def trim_metrics(path: str, last_step: int) -> None:
  """Drop lines logged after the checkpoint we resume from: they will be logged again."""
  if jax.process_index() != 0 or not os.path.isfile(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line)
    except (ValueError, KeyError):
      pass  # a torn last line from a crash
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)
