"""Orbax checkpoints of the training state, behind a few functions.

A checkpoint holds the student params, the optimizer state and the step (the data position follows from
the step), plus a JSON record of the config, the student config and the teacher's identity (path and
content hash). The frozen teacher itself is not saved. Saves are asynchronous and atomic: a step becomes
visible only once completely written, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

from absl import logging
import os
import time
import warnings
from typing import Any, Callable, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental.multihost_utils import sync_global_devices


def make_manager(directory: str, save_every: int, keep: int = 3, keep_every: int = 0,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """Saves every `save_every` steps (plus forced saves at preemption and at the end), keeping the
  latest `keep` and, if `keep_every` > 0, every `keep_every`-th step for good."""
  policies = [ocp.checkpoint_managers.LatestN(keep)]
  if keep_every:
    policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # Half-written steps from a crash are removed on start.
      create=True)
  if "://" not in directory:  # gs:// and other remote paths go to Orbax as they are
    directory = os.path.abspath(directory)
  return ocp.CheckpointManager(directory, options=options)


def open_read_only(directory: str) -> ocp.CheckpointManager:
  """A manager for whatever only reads a run (evaluation, the curve): unlike make_manager's, it never
  creates, deletes or renames anything, so another process's save in flight (a `*.orbax-checkpoint-tmp-*`
  folder) survives it. It sees finished steps only."""
  if "://" not in directory:
    directory = os.path.abspath(directory)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns about each option read_only turns off
  try:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, enable_async_checkpointing=False))
  finally:
    logging.set_verbosity(verbosity)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, force: bool = False) -> bool:
  """Start saving `state` at `step` (asynchronously); returns whether a save was started."""
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(mngr: ocp.CheckpointManager, step: int) -> Any:
  """The student params saved at `step`, as numpy arrays on the host (for evaluation: no optimizer
  state, and no target tree needed)."""
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return jax.tree.map(np.asarray, state["params"])


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   check_meta: Callable[[dict], None] = lambda meta: None
                   ) -> Tuple[Optional[Any], Optional[dict], Optional[int]]:
  """(state, meta, step) of the newest checkpoint that restores, or (None, None, None) if there are none.

  `abstract_state` is a tree of jax.ShapeDtypeStruct carrying the target shardings. A checkpoint that
  fails to restore (corrupted, truncated) is skipped with a warning in favour of the one before it; if
  checkpoints exist but none restores, this raises rather than silently starting over.
  `check_meta(meta)` runs on each step's JSON before its arrays are read, so an incompatible run is
  refused with its own error rather than reported as a damaged checkpoint.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      meta = read_meta(mngr, step)
    except Exception as e:
      meta, meta_error = None, e
    if meta is not None:
      check_meta(meta)
    try:
      if meta is None:
        raise meta_error
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for damaged files.
      logging.info("checkpoint at step %d failed to restore: %s", step, e)
      errors.append((step, _short(e)))
      continue
    if errors:
      moved = _quarantine(mngr, [s for s, _ in errors])
      warnings.warn(f"checkpoint step {errors[0][0]} is unreadable ({errors[0][1]}); resuming from "
                    f"step {step} instead (unreadable steps moved to {moved})")
    return restored["state"], restored["meta"], step
  if errors:
    raise RuntimeError(f"{mngr.directory}: none of the checkpoints {steps} can be restored (latest: "
                       f"{errors[0][1]}); refusing to start over: move the folder away to start afresh")
  return None, None, None


def _short(e: BaseException, limit: int = 160) -> str:
  text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return text if len(text) <= limit else text[:limit] + "..."


def _quarantine(mngr: ocp.CheckpointManager, steps) -> str:
  """Move unreadable steps aside (kept for inspection, never deleted) so they can be written again."""
  if jax.process_index() == 0:
    root = mngr.directory.parent / (mngr.directory.name + "_unreadable")
    root.mkdir(parents=True, exist_ok=True)
    for step in steps:
      src = mngr.directory / str(step)
      dst = root / f"{step}-{int(time.time())}"
      src.rename(dst)
  sync_global_devices("minilm_jax_quarantine")
  mngr.reload()
  return str(mngr.directory.parent / (mngr.directory.name + "_unreadable"))
