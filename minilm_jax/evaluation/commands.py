"""What minilm-eval runs: the table of one or several runs (every model on every probe and task, with
the paired differences), and the curve of one run's kept checkpoints beside that table. Both read the
runs and write only to OUT."""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from minilm_jax import checkpoint, hf, objective
from minilm_jax import workdir as wd
from minilm_jax.evaluation import report, runs, subsets
from minilm_jax.evaluation.protocol import DEFAULT_PROTOCOL, Protocol, made_with, settings_of
from minilm_jax.evaluation.suite import encode_speed, load_sts_sets, make_suite, quality


def evaluate_run(workdirs, out: Optional[str] = None, text=None, tasks: Sequence[str] = (),
                 protocol: Protocol = DEFAULT_PROTOCOL, finetune_too: bool = True, baselines: bool = True,
                 package_roots: Sequence[str] = (), text_field: str = "text", log=print,
                 teacher: Optional[str] = None, sts: Sequence[str] = ()) -> dict:
  """Every model of the runs (one teacher, the runs' students, one set of baselines) on every probe.
  Fine-tuning tasks: nsp, package and `tasks`; STS sets: `sts` (tasks.load_sts). Writes
  OUT/results.{json,md,png}; OUT defaults to WORKDIR/eval for one run and must be given for several.
  `teacher`: see runs.run_teacher_dir."""
  from transformers import AutoTokenizer
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  if not workdirs:
    raise ValueError("give at least one --workdir")
  if out is None:
    if len(workdirs) > 1:
      raise ValueError("several runs: give --out DIR for the shared table")
    out = wd.eval_dir(workdirs[0])
  runs.check_out(out, workdirs)
  sts_sets = load_sts_sets(sts)  # a bad pair file is refused before minutes of work
  cfg, models, teacher_dir = runs.models_of_runs(workdirs, baselines, teacher)
  tok = AutoTokenizer.from_pretrained(wd.local_student(workdirs[0]))
  ft = list(dict.fromkeys(["nsp", "package", *tasks])) if finetune_too else []
  t0 = time.time()
  s = make_suite(cfg, tok, models["teacher"], teacher_dir, protocol, text, ft, package_roots, text_field,
                 sts_sets, log)
  made_of, best, same_as = _best_subset(workdirs, models, s, baselines, cfg.seed, log)
  results = {}
  for name, (mcfg, params) in models.items():
    t = time.time()
    if name == runs.BEST and same_as:  # the same params as that baseline: the same scores, scored once
      results[name] = {**results[same_as], "teacher_layers": made_of[name], "same_as": same_as,
                       "eval_seconds": 0.0}
      continue
    row = {"layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size,
           "params_M": sum(np.size(x) for x in jax.tree.leaves(params)) / 1e6,
           "encode_tokens_per_s": encode_speed(mcfg, params)}
    if made_of.get(name) is not None:
      row["teacher_layers"] = made_of[name]
    row.update(quality(s, (mcfg, params), name == "teacher", finetune_too, log))
    row["eval_seconds"] = time.time() - t
    log(f"{name}: " + ", ".join(f"{k} {report.fmt(v)}" for k, v in row.items() if isinstance(v, dict)) +
        f" ({row['eval_seconds']:.0f}s)")
    results[name] = row
  os.makedirs(out, exist_ok=True)
  settings = settings_of(protocol, text, ft, package_roots, text_field, sts)
  diffs = report.comparisons(results, protocol.bootstrap, protocol.seed)
  hf.write_json(os.path.join(out, "results.json"), {
      "workdirs": workdirs, "teacher": teacher_dir, "pooling": list(s.pooling), "settings": settings,
      "package_labels": s.package.labels, "seconds": time.time() - t0, "results": results,
      "differences": diffs, "best_subset": best and {**best, "same_as": same_as}})
  metrics = report.metrics_of(results)
  note = report.best_subset_note(best, same_as) if best else \
      (f"No best layer subset: {s.dev_note}." if baselines and s.dev_note else "")
  report.write_table(results, metrics, protocol.seeds, os.path.join(out, "results.md"), diffs, note)
  report.plot_results(results, metrics, os.path.join(out, "results.png"))
  return results


def _best_subset(workdirs, models: dict, s, baselines: bool, seed: int, log):
  """({model: the teacher layers it is made of, or None}, the best subset's record or None, the name of
  the baseline it equals or ""). With baselines, the best layer subset is chosen on the suite's dev
  split (subsets.choose) and added to `models` as runs.BEST."""
  teacher_of_students = models.get("assistant", models["teacher"])[0].num_hidden_layers
  names = runs.student_names(workdirs)
  made_of = {name: runs.init_layers(w, teacher_of_students) for name, w in zip(names, workdirs)}
  if not baselines:
    return made_of, None, ""
  scfg = models[names[0]][0]
  fixed = runs.baseline_layers(models["teacher"][0].num_hidden_layers, scfg.num_hidden_layers)
  made_of.update(fixed)
  if s.dev is None:
    log(f"no best layer subset: {s.dev_note}")
    return made_of, None, ""
  best, params = subsets.choose(models["teacher"], scfg, s.tok, s.pooling, s.dev, s.protocol, seed, log)
  # Only an untrained baseline can stand in for it: a student started from those layers has trained.
  same_as = subsets.best_of(models, fixed, best["layers"])
  models[runs.BEST], made_of[runs.BEST] = (scfg, params), best["layers"]
  return made_of, best, same_as


def evaluate_curve(workdir: str, out: Optional[str] = None, text=None, tasks: Sequence[str] = (),
                   protocol: Protocol = DEFAULT_PROTOCOL, finetune_too: bool = False,
                   package_roots: Sequence[str] = (), text_field: str = "text", log=print,
                   teacher: Optional[str] = None, sts: Sequence[str] = ()) -> dict:
  """Quality against compute: the student of every kept checkpoint on the cheap probes (held-out
  relation loss, retrieval, agreement, package linear probe; fine-tuning with `finetune_too`), beside the
  flat lines of OUT/results.json (run `evaluate_run` first, with the same settings). Writes
  OUT/curve.{json,png}: {step: row} with the tokens seen at each step."""
  from transformers import AutoTokenizer
  out = out or wd.eval_dir(workdir)
  runs.check_out(out, [workdir])
  table = os.path.join(out, "results.json")
  if not os.path.isfile(table):
    raise FileNotFoundError(f"{table}: no results table; evaluate the run without --curve first")
  with open(table) as f:
    flat = json.load(f)
  ft = list(dict.fromkeys(["nsp", "package", *tasks])) if finetune_too else []
  want = settings_of(protocol, text, ft, package_roots, text_field, sts)
  if not made_with(flat["settings"], want):
    raise ValueError(f"{table} was made with other settings ({flat['settings']}): evaluate the curve with "
                     "the same settings, or evaluate the run again")
  sts_sets = load_sts_sets(sts)
  cfg, models, teacher_dir = runs.models_of_runs([workdir], baselines=False, teacher=teacher)
  name = runs.student_name(workdir)
  student_config = models[name][0]
  tok = AutoTokenizer.from_pretrained(wd.local_student(workdir))
  s = make_suite(cfg, tok, models["teacher"], teacher_dir, protocol, text, ft, package_roots, text_field,
                 sts_sets, log)
  mngr = runs.read_run(workdir)[2]
  curve = {}
  for step in mngr.all_steps():
    params = objective.student_params(checkpoint.restore_params(mngr, step))
    row = {"tokens": step * cfg.batch_size * cfg.data.max_len}
    row.update(quality(s, (student_config, params), False, finetune_too, log))
    log(f"step {step}: " + ", ".join(f"{k} {report.fmt(v)}" for k, v in row.items() if isinstance(v, dict)))
    curve[step] = row
  hf.write_json(os.path.join(out, "curve.json"), {"workdir": workdir, "settings": want, "curve": curve})
  report.plot_curve(curve, flat["results"], name, os.path.join(out, "curve.png"))
  return curve
