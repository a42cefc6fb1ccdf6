"""Where a benchmark's figures go: JSON lines that end with the date, the commit and the command that
made them, for docs/make_tables.py to turn into tables (the numbers on a page are never typed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
  """The checkout's short commit, with "-dirty" when tracked files differ from it ("" outside a git
  checkout): figures measured on uncommitted code say so."""
  git = lambda *args: subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()
  head = git("rev-parse", "--short", "HEAD")
  return head + "-dirty" if head and git("status", "--porcelain", "--untracked-files=no") else head


def provenance(script: str, argv=None) -> dict:
  """{"date", "commit", "command"} of this run of `script` (its path from the repository root). Take it
  when the run starts: the code that ran is the checkout's then."""
  argv = sys.argv[1:] if argv is None else argv
  return {"date": time.strftime("%Y-%m-%d"), "commit": commit(),
          "command": " ".join(["python", script, *argv])}


def run_json(cmd: list) -> dict:
  """The JSON object a benchmark command prints as its last line (run offline, in its own process);
  RuntimeError with its last line of stderr when it fails."""
  r = subprocess.run(cmd, capture_output=True, text=True,
                     env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
  lines = r.stdout.strip().splitlines()
  if r.returncode or not lines or not lines[-1].startswith("{"):
    raise RuntimeError(f"{' '.join(cmd)} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
  return json.loads(lines[-1])


def write_jsonl(path: str, lines: list) -> None:
  """`lines` (dicts) to `path`, one JSON object a line, replacing it whole (never half written)."""
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in lines)
  os.replace(path + ".tmp", path)
