"""Every recipe in configs/ compiled for the accelerator its docstring names (`Target: NAME`), by
minilm-compile, on this machine: the table of docs/compile.md and the JSON lines beside it.

  python benchmarks/compile_recipes.py                 # all recipes (about 15 CPU-minutes here)
  python benchmarks/compile_recipes.py --only demo     # one, merged into the stored results
  python benchmarks/compile_recipes.py --table-only    # re-make the table from the stored JSON

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


def compile_one(name: str) -> dict:
  path = os.path.join(ROOT, "configs", f"{name}.py")
  exe = os.path.join(os.path.dirname(sys.executable), "minilm-compile")
  r = subprocess.run([exe, "--config", path, "--target", recipe_target(path)], capture_output=True,
                     text=True)
  lines = r.stdout.strip().splitlines()
  if not lines or not lines[-1].startswith("{"):
    raise RuntimeError(f"{name}: minilm-compile failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
  commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  return {"config": name, "commit": commit, **json.loads(lines[-1])}


def load() -> dict:
  if not os.path.exists(RESULTS):
    return {}
  with open(RESULTS) as f:
    return {r["config"]: r for r in map(json.loads, f)}


def save(results: dict) -> None:
  tmp = RESULTS + ".tmp"
  with open(tmp, "w") as f:
    for name in sorted(results):
      f.write(json.dumps(results[name]) + "\n")
  os.replace(tmp, RESULTS)


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
  args = p.parse_args()
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
