"""minilm-distill runs, read-only: their checkpoints and records, the teacher a run was distilled from,
and the models a table compares (the teacher, the assistant of a chain, each run's student and the
undistilled baselines of its shape: random init, the first n teacher layers, every k-th from each
offset; the best layer subset is chosen on the text, in subsets.py). Nothing here writes to a run."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from minilm_jax import checkpoint, hf, objective
from minilm_jax import workdir as wd
from minilm_jax.config import teacher_differs, teacher_identity
from minilm_jax.families import config_from_dict, encoder_for
from minilm_jax.student import copy_teacher_layers, every_kth, teacher_init_layers

BASELINE_NAMES = {"random": "baseline: random init", "teacher_first": "baseline: first teacher layers",
                  "teacher": "baseline: every k-th teacher layer"}
BEST = "baseline: best layer subset"   # chosen on the text's dev split (subsets.py)


def open_checkpoints(workdir: str):
  """WORKDIR/checkpoints opened read-only (checkpoint.open_read_only), or None if there are none."""
  ckpts = wd.join(workdir, wd.CHECKPOINTS)
  return checkpoint.open_read_only(ckpts) if wd.exists(ckpts) else None


def check_out(out: str, workdirs: Sequence[str]) -> None:
  """An evaluation writes only to its output folder, never into a run it reads (its eval/ excepted)."""
  o = os.path.realpath(out)
  inside = lambda path, folder: path == folder or path.startswith(folder + os.sep)
  for w in workdirs:
    if wd.is_remote(w) or not inside(o, os.path.realpath(w)):
      continue
    if not inside(o, os.path.realpath(wd.eval_dir(w))):
      raise ValueError(f"--out {out} is inside the run {w}, which minilm-eval only reads: write the "
                       f"results elsewhere, or leave out --out for {wd.eval_dir(w)}")


def read_run(workdir: str):
  """(config, meta, manager, latest step) of a minilm-distill workdir, read-only."""
  mngr = open_checkpoints(workdir)
  step = mngr.latest_step() if mngr else None
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint; is this a minilm-distill workdir?")
  meta = checkpoint.read_meta(mngr, step)
  return ml_collections.ConfigDict(meta["config"]), meta, mngr, step


def checkpoint_student(workdir: str, step: int):
  """(config, params) of the student saved at `step` of a run, also one still training (no exported
  student yet): the config from the checkpoint's own record, so any depth or width the run had."""
  _, meta, mngr, _ = read_run(workdir)
  if step not in mngr.all_steps():
    raise FileNotFoundError(f"{workdir} has no checkpoint at step {step} (it has {sorted(mngr.all_steps())})")
  meta = checkpoint.read_meta(mngr, step)
  return (config_from_dict(meta["student_config"]),
          objective.student_params(checkpoint.restore_params(mngr, step)))


def run_teacher_dir(meta: dict, workdir: str, teacher: Optional[str] = None) -> str:
  """The local folder of the teacher a run recorded in its checkpoint `meta`: `teacher` when given
  (minilm-eval --teacher), else the path where the run found it, else the run's config.teacher resolved
  on this machine (a hub id, the packaged copy, a gs:// folder), so that a run distilled on a TPU VM or
  a GPU box can be evaluated where its teacher lives elsewhere. Whichever it is must hold the recorded
  teacher (sha256 of config and weights, and of the tokenizer where recorded): another is a ValueError,
  since a table against another teacher would be wrong without saying so. FileNotFoundError if none."""
  rec, named = meta["teacher"], meta["config"].get("teacher", "")
  if teacher is None and os.path.isdir(rec["path"]):
    folder = rec["path"]
  else:
    try:
      folder = hf.resolve(teacher if teacher is not None else named)
    except FileNotFoundError as e:
      if teacher is not None:
        raise
      also = "" if os.path.abspath(named) == rec["path"] else \
          f", and its config's teacher {named!r} is not found here either ({e})"
      raise FileNotFoundError(f"{workdir} was distilled from the teacher at {rec['path']}, which is not on "
                              f"this machine{also}: give its folder with --teacher DIR") from None
  differs = teacher_differs(rec, teacher_identity(folder, hf.load_config(folder)))
  if differs:
    raise ValueError(f"{folder} is not the teacher {workdir} was distilled from: its {differs} differ from "
                     f"the run's (recorded from {rec['path']}); give the run's teacher with --teacher DIR")
  return folder


def student_name(workdir: str) -> str:
  """The table's name for a run's student: "student: " and the workdir's last folder."""
  return f"student: {os.path.basename(os.path.normpath(workdir))}"


def student_names(workdirs: Sequence[str]) -> List[str]:
  """The table's names of the runs' students: student_name, or "student: " and the whole workdir where
  two runs' folders share a name."""
  names = [student_name(w) for w in workdirs]
  return names if len(set(names)) == len(names) else [f"student: {w}" for w in workdirs]


def baseline_inits(teacher_layers: int, student_layers: int) -> List[str]:
  """The student inits of the baselines before every offset was one (scripts written against
  minilm_jax.evaluate import it; minilm-eval builds baseline_layers). Every k-th layer is left out where
  it is the first n layers (k = 1: 6 → 4 layers, 12 → 8): the same model, scored once."""
  same = teacher_init_layers("teacher", teacher_layers, student_layers) == \
      teacher_init_layers("teacher_first", teacher_layers, student_layers)
  return ["random", "teacher_first"] + ([] if same else ["teacher"])


def baseline_layers(teacher_layers: int, student_layers: int) -> Dict[str, Optional[List[int]]]:
  """The fixed undistilled baselines of a student's depth by name, each with the teacher layers it is
  made of (0-based; None: random init): the first n, and every k-th from each of the k offsets (from
  layer 0: "every k-th teacher layer", the paper's start; from layer o: "... from layer o"), each one
  once: where k = 1 every k-th is the first n."""
  out = {BASELINE_NAMES["random"]: None, BASELINE_NAMES["teacher_first"]: list(range(student_layers))}
  for offset, layers in every_kth(teacher_layers, student_layers).items():
    if layers not in out.values():
      out[BASELINE_NAMES["teacher"] + (f" from layer {offset}" if offset else "")] = layers
  return out


def init_layers(workdir: str, teacher_layers: int) -> Optional[List[int]]:
  """The teacher layers (0-based) a run's student started from, or None: a random init, or a "best" init
  whose choice the run did not record (its checkpoint's student_init_layers)."""
  cfg, meta, _, _ = read_run(workdir)
  if cfg.student.init == "random":
    return None
  if cfg.student.init == "best":
    return meta.get("student_init_layers")
  return teacher_init_layers(cfg.student.init, teacher_layers, cfg.student.num_layers)


def models_of_runs(workdirs: Sequence[str], baselines: bool = True, teacher: Optional[str] = None):
  """(cfg, {name: (config, params)}, teacher_dir) for the teacher, the assistant (if a chain), each run's
  student and the undistilled baselines of the students' architecture (once). The runs must share the
  teacher and the student config. cfg is the first run's. `teacher`: see run_teacher_dir."""
  runs = [read_run(w) for w in workdirs]
  cfg, meta = runs[0][0], runs[0][1]
  for w, (_, m, _, _) in zip(workdirs[1:], runs[1:]):
    if m["teacher"]["sha256"] != meta["teacher"]["sha256"]:
      raise ValueError(f"{w} was distilled from another teacher than {workdirs[0]} "
                       f"({m['teacher']['path']} vs {meta['teacher']['path']}); compare runs of one teacher")
    if m["student_config"] != meta["student_config"]:
      diff = sorted(k for k in set(m["student_config"]) | set(meta["student_config"])
                    if m["student_config"].get(k) != meta["student_config"].get(k))
      raise ValueError(f"{w} has another student shape than {workdirs[0]} ({', '.join(diff)} differ); "
                       "compare runs of one student shape")
  models = {}
  a_dir = wd.join(workdirs[0], wd.ASSISTANT)
  a_mngr = open_checkpoints(a_dir)
  if a_mngr is not None and a_mngr.latest_step() is not None:  # a chain: the teacher is the assistant's
    a_meta = checkpoint.read_meta(a_mngr, a_mngr.latest_step())
    teacher_dir = run_teacher_dir(a_meta, a_dir, teacher)
    models["teacher"] = hf.load_pretrained(teacher_dir)
    # The student stage's teacher is the chain's own assistant, exported in WORKDIR/assistant.
    models["assistant"] = hf.load_pretrained(run_teacher_dir(meta, workdirs[0], wd.local_student(a_dir)))
    cfg.loss.teacher_layer = a_meta["config"]["loss"]["teacher_layer"]
  else:
    teacher_dir = run_teacher_dir(meta, workdirs[0], teacher)
    models["teacher"] = hf.load_pretrained(teacher_dir)
  for name, w in zip(student_names(workdirs), workdirs):
    encoder, sparams = hf.load_student(wd.local_student(w))
    models[name] = (encoder.config, objective.student_params(sparams))
  if baselines:
    tcfg, tparams = models["teacher"]
    scfg, key = encoder.config, jax.random.key(cfg.seed)
    tparams = jax.tree.map(jnp.asarray, tparams)
    for name, layers in baseline_layers(tcfg.num_hidden_layers, cfg.student.num_layers).items():
      p = encoder_for(scfg).init_params(key) if layers is None else \
          copy_teacher_layers(scfg, tparams, layers, key)
      models[name] = (scfg, jax.device_get(p))
  return cfg, models, teacher_dir
