"""The next-sentence fine-tuning probe of `minilm-eval` (its protocol: 3 seeds, lr and epoch chosen on
dev) for one checkpoint of a run, also one still training; the recipe screens of docs/experiments.md use it.

  python experiments/nsp_checkpoint.py --workdir workdirs/quality_l3 --step 500 [--text /tmp/book.txt]

The student's config comes from the checkpoint's own record (any depth or width), its tokenizer and
pooling from the run's teacher. About 5 minutes for a 3×384 student on this project's 2 cores. Prints
one JSON line: mean, sd over seeds, each seed's test. To pair a checkpoint with other models, use
`nsp_models.py --checkpoint DIR@STEP`.
"""

import argparse
import json

from transformers import AutoTokenizer

from minilm_jax import corpus
from minilm_jax.evaluation import finetune, protocol, runs, tasks
from minilm_jax import hf


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, required=True)
  p.add_argument("--text", help="held-out text, as minilm-eval --text (default: the stdlib's held-out split)")
  a = p.parse_args()
  try:
    config, params = runs.checkpoint_student(a.workdir, a.step)
  except FileNotFoundError as e:
    p.error(str(e))
  teacher_dir = runs.run_teacher_dir(runs.read_run(a.workdir)[1], a.workdir)
  pooling = (hf.sentence_pooling(teacher_dir) or ("mean", False))[0]  # as minilm-eval's
  tok = AutoTokenizer.from_pretrained(teacher_dir)  # the student's tokenizer is its teacher's
  d = protocol.DEFAULT_PROTOCOL
  task = tasks.load_task("nsp", d.seed, corpus.heldout_docs(a.text), d)
  r = finetune.finetune(config, params, tok, task, d.lrs, d.epochs, d.seeds, d.batch, d.finetune_len, pooling,
                        print)
  print(json.dumps({"workdir": a.workdir, "step": a.step, "text": a.text, "nsp": r["value"],
                    "sd": r["spread"], "seeds": [s["test"] for s in r["seeds"]]}))


if __name__ == "__main__":
  main()
