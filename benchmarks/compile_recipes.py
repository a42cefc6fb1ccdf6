"""Every recipe in configs/ compiled for the accelerator its docstring names (`Target: NAME`), by
minilm-compile, on this machine: the table of docs/compile.md and the JSON lines beside it.

  python benchmarks/compile_recipes.py                 # all recipes (about 15 CPU-minutes here)
  python benchmarks/compile_recipes.py --only demo     # one, merged into the stored results
  python benchmarks/compile_recipes.py --table-only    # re-make the table from the stored JSON
  python benchmarks/compile_recipes.py --bert-base     # the BERT-base step on v4-32 and v5e-16 (~10 min)

Writes docs/results/compile_recipes.jsonl (one minilm-compile report per recipe, plus its config name
and the commit), then remakes the tables of docs/ from their JSON (docs/make_tables.py, which renders
this one into docs/compile.md and the README's table of recipes). Needs libtpu (the `tpu` extra) and, for
GPU targets, the CUDA plugin (the `cuda` extra).
"""

import argparse
import ast
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results", "compile_recipes.jsonl")
sys.path.insert(0, os.path.join(ROOT, "docs"))
import make_tables  # noqa: E402  (renders every table of docs/, this one's among them)
import record  # noqa: E402  (beside this script)


def recipe_target(path: str) -> str:
  """The `Target: NAME` line of a config file's docstring; ValueError without one."""
  doc = ast.get_docstring(ast.parse(open(path).read())) or ""
  m = re.search(r"^Target: (\S+)", doc, re.M)
  if not m:
    raise ValueError(f"{path}: its docstring names no 'Target: NAME' line")
  return m.group(1)


def recipes():
  folder = os.path.join(ROOT, "configs")
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


# The BERT-base step of issue 37 (configs/v2_bert_base_6x384.py) on its targets, at both lengths and with
# FSDP: (name, target, overrides). --bert-base writes them to BERT_BASE_RESULTS.
BERT_BASE_CONFIG = "v2_bert_base_6x384"
# Rows without "fsdp" are data-parallel (the recipe itself shards over 4 for its v4-32).
BERT_BASE = [
    ("v4-32, T=128", "v4-32", ["--config.data.max_len=128", "--config.parallel.fsdp=1"]),
    ("v4-32, T=512", "v4-32", ["--config.data.max_len=512", "--config.parallel.fsdp=1"]),
    ("v5e-16, T=128", "v5e-16", ["--config.data.max_len=128", "--config.parallel.fsdp=1"]),
    ("v5e-16, T=512", "v5e-16", ["--config.data.max_len=512", "--config.parallel.fsdp=1"]),
    ("v4-32, T=128, fsdp=4", "v4-32", ["--config.data.max_len=128", "--config.parallel.fsdp=4"]),
    ("v4-32, T=512, fsdp=4", "v4-32", ["--config.data.max_len=512", "--config.parallel.fsdp=4"]),
    ("v5e-16, T=512, fsdp=16", "v5e-16", ["--config.data.max_len=512", "--config.parallel.fsdp=16"]),
]
BERT_BASE_RESULTS = os.path.join(ROOT, "docs", "results", "compile_bert_base.jsonl")


def compile_one(name: str, target=None, overrides=(), label=None) -> dict:
  """minilm-compile's report of configs/NAME.py for `target` (default: its docstring's), with the
  commit and the command; `label`: a name for the run (then stored as "run")."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  exe = os.path.join(os.path.dirname(sys.executable), "minilm-compile")
  argv = ["--config", path, "--target", target or recipe_target(path), *overrides]
  r = subprocess.run([exe, *argv], capture_output=True, text=True)
  lines = r.stdout.strip().splitlines()
  if not lines or not lines[-1].startswith("{"):
    raise RuntimeError(f"{name}: minilm-compile failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
  commit = record.commit()
  command = " ".join(["minilm-compile", "--config", f"configs/{name}.py", *argv[2:]])
  return {**({"run": label} if label else {}), "config": name, "commit": commit, "command": command,
          **json.loads(lines[-1])}


def load(path=RESULTS, key="config") -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r[key]: r for r in map(json.loads, f)}


def save(results: dict, path=RESULTS) -> None:
  record.write_jsonl(path, [results[name] for name in sorted(results)])


def table(results: dict) -> str:
  """The markdown table of docs/compile.md from the stored reports (docs/make_tables.py makes it)."""
  return make_tables.compile_recipes_table(results)


def write_page() -> None:
  for page in make_tables.write():
    print(f"rewrote {page}", file=sys.stderr)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", action="append", help="a recipe (its file name without .py); repeatable")
  p.add_argument("--table-only", action="store_true")
  p.add_argument("--bert-base", action="store_true", help="instead of the recipes: the BERT-base step on "
                 "v4-32 and v5e-16, T = 128 and 512, and with FSDP (docs/results/compile_bert_base.jsonl)")
  args = p.parse_args()
  if args.bert_base:
    runs = load(BERT_BASE_RESULTS, "run")
    for run, target, overrides in BERT_BASE:
      print(f"compiling {run} ...", file=sys.stderr, flush=True)
      runs[run] = compile_one(BERT_BASE_CONFIG, target, overrides, label=run)
      save(runs, BERT_BASE_RESULTS)
    write_page()
    return
  results = load()
  if not args.table_only:
    for name in args.only or recipes():
      print(f"compiling {name} ...", file=sys.stderr, flush=True)
      results[name] = compile_one(name)
      save(results)  # after each: a crash keeps what was compiled
  write_page()
  print(table(results))


if __name__ == "__main__":
  main()
