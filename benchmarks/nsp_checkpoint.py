"""The next-sentence fine-tuning probe of `minilm-eval` (its protocol: 3 seeds, lr and epoch chosen on
dev) for one checkpoint of a run, also one still training; the recipe screens of the README use it.

  python benchmarks/nsp_checkpoint.py --workdir workdirs/quality_l3 --step 500 [--text /tmp/book.txt]

A run still in progress has no exported student yet: `--like` names a finished run with the same
student shape and teacher (the student's config and tokenizer are read from it). About 5 minutes for a
3×384 student on this project's 2 cores. Prints one JSON line: mean, sd over seeds, each seed's test.
"""

import argparse
import json

from transformers import AutoTokenizer

from minilm_jax import checkpoint, hf, objective
from minilm_jax import evaluate as ev
from minilm_jax import workdir as wd


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, required=True)
  p.add_argument("--text", help="held-out text, as minilm-eval --text (default: the stdlib's held-out split)")
  p.add_argument("--like", help="a finished run of the same student shape (default: --workdir itself)")
  a = p.parse_args()
  like = a.like or a.workdir
  _, models, teacher_dir = ev.models_of_runs([like], baselines=False)
  pooling = (hf.sentence_pooling(teacher_dir) or ("mean", False))[0]  # as minilm-eval's
  config = models[ev.student_name(like)][0]
  tok = AutoTokenizer.from_pretrained(wd.local_student(like))
  params = objective.student_params(checkpoint.restore_params(ev.read_run(a.workdir)[2], a.step))
  d = ev.DEFAULT_PROTOCOL
  task = ev.load_task("nsp", d.seed, ev.heldout_docs(a.text), d)
  r = ev.finetune(config, params, tok, task, d.lrs, d.epochs, d.seeds, d.batch, d.finetune_len, pooling, print)
  print(json.dumps({"workdir": a.workdir, "step": a.step, "text": a.text, "nsp": r["value"],
                    "sd": r["spread"], "seeds": [s["test"] for s in r["seeds"]]}))


if __name__ == "__main__":
  main()
