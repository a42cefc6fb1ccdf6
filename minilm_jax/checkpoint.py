"""Orbax checkpoints of the training state, behind a few functions.

A checkpoint holds the student params, the optimizer state and the step (the data position follows from
the step), plus a JSON record of the config, the student config and the teacher's identity (path and
content hash). The frozen teacher itself is not saved. Saves are asynchronous and atomic: a step becomes
visible only once completely written, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional, Tuple

import orbax.checkpoint as ocp


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
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, force: bool = False) -> bool:
  """Start saving `state` at `step` (asynchronously); returns whether a save was started."""
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any
                   ) -> Tuple[Optional[Any], Optional[dict], Optional[int]]:
  """(state, meta, step) of the newest checkpoint that restores, or (None, None, None) if there are none.

  `abstract_state` is a tree of jax.ShapeDtypeStruct carrying the target shardings. A checkpoint that
  fails to restore (corrupted, truncated) is skipped with a warning in favour of the one before it; if
  checkpoints exist but none restores, this raises rather than silently starting over.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      if errors:
        warnings.warn(f"checkpoint step {errors[0][0]} is unreadable ({errors[0][1]}); "
                      f"resuming from step {step} instead")
      return restored["state"], restored["meta"], step
    except Exception as e:  # Orbax raises many types for damaged files.
      logging.warning("checkpoint at step %d failed to restore: %s", step, e)
      errors.append((step, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
  if errors:
    raise RuntimeError(f"{mngr.directory}: none of the checkpoints {steps} can be restored (latest: "
                       f"{errors[0][1]}); refusing to start over: move the folder away to start afresh")
  return None, None, None
