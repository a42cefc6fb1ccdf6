"""The BERT-base step (configs/v2_bert_base_6x384.py on v4-32, T = 128 and 512) compiled at each of a
list of commits: what each change did to the compiler's estimate of the step.

  python experiments/compile_history.py dbb1842=before 93954e5 3ca274f 012e363 44c8892 5b78db6 \
      --out docs/results/compile_history.jsonl          # about 10 CPU-minutes here

Each commit is checked out into a temporary git worktree and its own minilm-compile runs there (with the
libtpu of this environment), so every row is that commit's code. Writes one JSON line per (commit, T):
the commit, its subject (or the label given as COMMIT=LABEL), the command and minilm-compile's report; docs/make_tables.py renders them in
docs/compile.md ("What moved the step").
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (128, 512)
# Run from the worktree: its own package comes first on sys.path, before this environment's editable one.
COMPILE = "import sys; from minilm_jax import cli; sys.argv = ['minilm-compile'] + sys.argv[1:]; cli.compile_main()"


def git(*args, cwd=ROOT) -> str:
  return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def compile_at(worktree: str, seq: int) -> dict:
  argv = ["--config", "configs/v2_bert_base_6x384.py", "--target", "v4-32", f"--config.data.max_len={seq}"]
  r = subprocess.run([sys.executable, "-c", COMPILE, *argv], cwd=worktree, capture_output=True, text=True)
  lines = r.stdout.strip().splitlines()
  if not lines or not lines[-1].startswith("{"):
    raise RuntimeError(f"minilm-compile failed in {worktree}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
  return {"command": " ".join(["minilm-compile", *argv]), **json.loads(lines[-1])}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("commits", nargs="+", help="commits, oldest first; COMMIT=LABEL names its row")
  p.add_argument("--out", required=True, help="the JSON lines to write")
  args = p.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for arg in args.commits:
      commit, _, label = arg.partition("=")
      worktree = os.path.join(tmp, commit)
      git("worktree", "add", "--detach", worktree, commit)
      try:
        subject = label or git("log", "-1", "--format=%s", commit).split(";")[0]
        for seq in LENGTHS:
          print(f"compiling {commit}, T={seq} ...", flush=True)
          rows.append({"commit": git("rev-parse", "--short", commit), "subject": subject,
                       **compile_at(worktree, seq)})
      finally:
        git("worktree", "remove", "--force", worktree)
  with open(args.out + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(args.out + ".tmp", args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
