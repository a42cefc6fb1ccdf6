"""The next-sentence fine-tuning probe of `minilm-eval` for named models of a finished run's table (the
teacher, the run's student, the undistilled baselines), with another lr × epochs grid than the
evaluation's own: the check in docs/experiments.md that the Rust book's next-sentence gap is not an artefact of the
default 2-epoch grid uses it. `--teacher-layers` adds students made of other teacher layers (the first
4, or 3 that skip one), as the baselines are made of theirs: where on this text the teacher's pair skill
lies; `--checkpoint DIR@STEP` adds the student of another run's checkpoint (a screen, of any depth),
paired with the rest.

  python experiments/nsp_models.py --workdir workdirs/quality_l3 --text /tmp/book.txt --epochs 4 \
      --model teacher --model "student: quality_l3" --model "baseline: first teacher layers"

Everything else is the evaluation's protocol (3 seeds, the dev split carved from the training pairs, the
(lr, epoch) chosen on dev, test scored once). The command above took about 30 minutes alone on this
project's 2 cores (measured 2026-12-04; the teacher about half of it). Prints one JSON line per model:
mean, sd over seeds, each seed's test score and chosen (lr, epoch); then one per pair of models: their
difference paired over the test pairs, with its SE (minilm-eval's evaluation.stats.paired_difference).
"""

import argparse
import dataclasses
import json

import jax

from transformers import AutoTokenizer

from minilm_jax import corpus
from minilm_jax.evaluation import finetune, protocol, runs, stats, tasks
from minilm_jax import hf
from minilm_jax import student
from minilm_jax import workdir as wd


def main():
  d = protocol.DEFAULT_PROTOCOL
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a finished run (its student is exported)")
  p.add_argument("--text", help="held-out text, as minilm-eval --text (default: the stdlib's held-out split)")
  p.add_argument("--model", action="append", required=True,
                 help="a row name of the run's table, as minilm-eval prints it (repeat for several)")
  p.add_argument("--teacher-layers", action="append", default=[], metavar="I,J,...",
                 help="also a student of the run's width made of these teacher layers (0-based), as the "
                      "baselines are of theirs, e.g. 0,1,2,3 for the first 4 (repeat for several)")
  p.add_argument("--checkpoint", action="append", default=[], metavar="DIR@STEP",
                 help="also the student of a run's checkpoint (any depth or width, the run may still be "
                      "training; it must share the teacher), e.g. workdirs/screen_d4@500 (repeat for several)")
  p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs of the grid (default {d.epochs})")
  p.add_argument("--lr", type=float, action="append", help=f"lrs of the grid, repeat (default {d.lrs})")
  a = p.parse_args()
  if a.epochs < 1:
    p.error(f"--epochs must be at least 1, not {a.epochs}")
  # The names are known before any model is built (the baselines take a minute): refuse a typo at once.
  names = ["teacher", runs.student_name(a.workdir), *runs.BASELINE_NAMES.values()]
  if wd.exists(wd.join(a.workdir, wd.ASSISTANT)):  # a chain's table has its teaching assistant too
    names.insert(1, "assistant")
  for m in a.model:
    if m not in names:
      p.error(f"no model {m!r} in {a.workdir}'s table; one of: {', '.join(repr(n) for n in names)}")
  try:
    subsets = [[int(i) for i in x.split(",")] for x in a.teacher_layers]
  except ValueError:
    p.error(f"--teacher-layers takes 0-based layer numbers joined by commas, not {a.teacher_layers}")
  # A checkpoint loads in seconds: read them before the models, so that a bad one is refused at once too.
  sha, checkpoints = runs.read_run(a.workdir)[1]["teacher"]["sha256"], {}
  for spec in a.checkpoint:
    run, _, step = spec.rpartition("@")
    if not run or not step.isdigit():
      p.error(f"--checkpoint takes DIR@STEP, not {spec!r}")
    if runs.read_run(run)[1]["teacher"]["sha256"] != sha:
      p.error(f"{run} was distilled from another teacher than {a.workdir}")
    try:
      checkpoints[f"{runs.student_name(run)} at step {step}"] = runs.checkpoint_student(run, int(step))
    except FileNotFoundError as e:
      p.error(str(e))
  lrs = tuple(a.lr) if a.lr else d.lrs
  baselines = any(m.startswith("baseline") for m in a.model)  # only build them when asked for
  _, models, teacher_dir = runs.models_of_runs([a.workdir], baselines=baselines)
  for m in a.model:
    if m not in models:  # every k-th layer where k = 1: the first teacher layers' row is that model
      p.error(f"{m!r} is {runs.BASELINE_NAMES['teacher_first']!r} for this run's depth: ask for that one")
  pooling = (hf.sentence_pooling(teacher_dir) or ("mean", False))[0]  # as minilm-eval's
  tparams = models["teacher"][1]
  scfg = models[runs.student_name(a.workdir)][0]
  made = []
  for layers in subsets:
    c = dataclasses.replace(scfg, num_hidden_layers=len(layers))
    made.append(f"teacher layers {','.join(map(str, layers))}")
    try:
      models[made[-1]] = (c, jax.device_get(student.copy_teacher_layers(c, tparams, layers, jax.random.key(0))))
    except ValueError as e:
      p.error(str(e))
  models.update(checkpoints)
  made += list(checkpoints)
  tok = AutoTokenizer.from_pretrained(wd.local_student(a.workdir))
  task = tasks.load_task("nsp", d.seed, corpus.heldout_docs(a.text), d)
  done = {}
  for m in a.model + made:
    config, params = models[m]
    r = done[m] = finetune.finetune(config, params, tok, task, lrs, a.epochs, d.seeds, d.batch,
                                    d.finetune_len, pooling, print)
    print(json.dumps({"workdir": a.workdir, "model": m, "text": a.text, "epochs": a.epochs, "lrs": lrs,
                      "nsp": r["value"], "sd": r["spread"], "seeds": [s["test"] for s in r["seeds"]],
                      "chosen": [(s["lr"], s["epoch"]) for s in r["seeds"]]}), flush=True)
  names = list(done)
  for i, x in enumerate(names):
    for y in names[i + 1:]:
      diff = stats.paired_difference("nsp", done[x], done[y], None, d.bootstrap, d.seed)
      print(json.dumps({"difference": f"{x} − {y}", "nsp": diff["value"], "se": diff["se"],
                        "z": diff["z"]}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
  main()
