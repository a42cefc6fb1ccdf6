"""README.md and docs/: every relative link resolves, every table is what its JSON makes, the README stays
a manual (at most 300 lines), and every command the pages show exists and answers --help."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _make_tables():
  spec = importlib.util.spec_from_file_location("make_tables", os.path.join(ROOT, "docs", "make_tables.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


make_tables = _make_tables()
# experiments/README.md, the one-off studies' index, is held to the docs' checks (links, commands, paths).
PAGES = make_tables.pages() + [os.path.join(ROOT, "experiments", "README.md")]
FENCE = re.compile(r"^(```|~~~)")


def read(page: str) -> str:
  with open(page) as f:
    return f.read()


def prose_and_code(text: str) -> tuple[list[str], list[str]]:
  """The page's lines outside fenced code blocks, and the text of each bash/sh code block."""
  prose, blocks, block, lang = [], [], None, None
  for line in text.split("\n"):
    m = FENCE.match(line.strip())
    if m and block is None:
      block, lang = [], line.strip()[3:].strip()
    elif m:
      if lang in ("bash", "sh", "shell", "console"):
        blocks.append("\n".join(block))
      block = None
    elif block is not None:
      block.append(line)
    else:
      prose.append(line)
  return prose, blocks


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: inline markup dropped, lower case, punctuation removed, spaces to -."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)        # [text](link) -> text
  text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "").lower()
  keep = lambda ch: ch in "-_ " or unicodedata.category(ch)[0] in "LNM"
  return "".join(ch for ch in text if keep(ch)).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(page: str) -> frozenset:
  prose, _ = prose_and_code(read(page))
  seen, out = {}, set()
  for line in prose:
    m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      s = slug(m.group(1))
      out.add(s if s not in seen else f"{s}-{seen[s]}")
      seen[s] = seen.get(s, 0) + 1
  out.update(re.findall(r'<a (?:id|name)="([^"]+)"', "\n".join(prose)))
  return frozenset(out)


def links(page: str) -> list[str]:
  """Every link target in the page's prose (inline code removed first), images included."""
  prose, _ = prose_and_code(read(page))
  text = re.sub(r"`[^`\n]*`", "", "\n".join(prose))
  return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def broken_links(page: str) -> list[str]:
  bad = []
  for target in links(page):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):        # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(full):
      bad.append(f"{target}: no such file")
    elif anchor and (not full.endswith(".md") or anchor not in anchors(full)):
      bad.append(f"{target}: no heading with that anchor in {os.path.relpath(full, ROOT)}")
  return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
  assert not broken_links(page), f"{os.path.relpath(page, ROOT)}: {broken_links(page)}"


def test_the_link_check_sees_a_broken_link_and_a_broken_anchor(tmp_path):
  (tmp_path / "a.md").write_text("# A page\n\n## The `b` section, again\n\n[ok](#the-b-section-again) "
                                 "[no file](missing.md) [no anchor](a.md#nowhere) [web](https://x.org)\n"
                                 "```bash\n[not a link](inside/code.md)\n```\n")
  assert anchors(str(tmp_path / "a.md")) == {"a-page", "the-b-section-again"}
  assert broken_links(str(tmp_path / "a.md")) == [
      "missing.md: no such file", "a.md#nowhere: no heading with that anchor in " +
      os.path.relpath(str(tmp_path / "a.md"), ROOT)]


def test_every_table_is_what_its_json_makes():
  diffs = make_tables.check()
  assert not diffs, "run python docs/make_tables.py; these pages differ from their JSON:\n" + "\n".join(diffs)


def test_the_table_check_sees_a_hand_edited_number():
  page = os.path.join(ROOT, "docs", "results.md")
  text = read(page)
  name = make_tables.tables_in(text)[0]
  fresh = make_tables.regenerate(text, page)
  assert fresh == text
  start = fresh.index(f"<!-- table:{name} -->")
  row = fresh.index("\n| ", fresh.index("| --- |", start)) + 1       # the first data row
  edited = fresh[:row] + fresh[row:].replace("0", "9", 1)
  assert edited != fresh and make_tables.regenerate(edited, page) == fresh


def test_every_transcribed_table_is_used_and_labelled():
  import json
  used = {n for p in PAGES for n in make_tables.tables_in(read(p))}
  folder = os.path.join(ROOT, "docs", "results", "transcribed")
  for f in sorted(os.listdir(folder)):
    with open(os.path.join(folder, f)) as fh:
      doc = json.load(fh)
    assert doc["source"].startswith("transcribed from ") and "not kept" in doc["source"], f
    for key in doc["tables"]:
      assert f"{f[:-5]}.{key}" in used, f"{f}: table {key} is on no page"


def test_every_experiment_is_in_its_index():
  folder = os.path.join(ROOT, "experiments")
  index = read(os.path.join(folder, "README.md"))
  scripts = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
  assert scripts and not [f for f in scripts if f"`experiments/{f}`" not in index], "experiments/README.md"


def test_the_readme_is_a_manual():
  with open(os.path.join(ROOT, "README.md")) as f:
    n = sum(1 for _ in f)
  assert n <= 300, f"README.md has {n} lines; the rest belongs in docs/"


# ---- commands -------------------------------------------------------------------------------------------

SCRIPTS = ("minilm-distill", "minilm-eval", "minilm-prepare", "minilm-compile")


def code_blocks() -> list[tuple[str, str]]:
  return [(p, b.replace("\\\n", " ")) for p in PAGES for b in prose_and_code(read(p))[1]]


def inline_code() -> list[tuple[str, str]]:
  """Each `code span` of the pages' prose, as a one-line command."""
  return [(p, span) for p in PAGES for span in re.findall(r"`([^`\n]+)`", "\n".join(prose_and_code(read(p))[0]))]


def entry_points() -> set[tuple[str, ...]]:
  """Every program the pages' code blocks run: console scripts, python FILE.py, python -m, launch/*.sh."""
  found = set()
  for _, block in code_blocks() + inline_code():
    for m in re.finditer(r"(?:^|[;&|]|\bdo|\bthen)\s*(?:[A-Z_]+=\S+\s+)*(?:\S*/)?(minilm-[a-z]+)\b", block,
                         re.M):
      found.add((m.group(1),))
    for m in re.finditer(r"\bpython3? ((?:benchmarks|experiments|docs)/[\w/.-]+\.py)\b", block):
      found.add(("python", m.group(1)))
    for m in re.finditer(r"\bpython3? -m (minilm_jax\.\w+)", block):
      found.add(("python", "-m", m.group(1)))
    for m in re.finditer(r"(?:^|\s)(launch/[\w.-]+\.sh)\b", block):
      found.add(("bash", m.group(1)))
  return found


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR="/tmp")
  env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
  return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def executable(entry: tuple[str, ...]) -> list[str]:
  if entry[0] in SCRIPTS:
    return [os.path.join(BIN, entry[0])]
  if entry[0] == "python":
    return [sys.executable, *entry[1:]]
  return list(entry)


def test_the_pages_show_the_commands_that_matter():
  found = entry_points()
  assert {(s,) for s in SCRIPTS} <= found
  assert {("python", "docs/make_tables.py"), ("bash", "launch/tpu_vm.sh"), ("bash", "launch/gpu.sh"),
          ("python", "-m", "minilm_jax.bench")} <= found


def test_every_command_shown_answers_help():
  failed = []
  for entry in sorted(entry_points()):
    if entry[0] in SCRIPTS:
      assert entry[0] in read(os.path.join(ROOT, "setup.cfg")), f"{entry[0]}: not a console script"
    r = run(executable(entry) + ["--help"])
    if r.returncode != 0 or not (r.stdout + r.stderr).strip():
      failed.append(f"{' '.join(entry)} --help: exit {r.returncode}: {(r.stderr.strip() or '?')[-300:]}")
  assert not failed, "\n".join(failed)


def test_the_fast_commands_run_as_written():
  # The launchers' --dry-run examples print their commands without a cloud or a GPU; make_tables --check
  # is the table check itself.
  fast = [line for _, block in code_blocks() for line in block.split("\n")
          if "--dry-run" in line or "docs/make_tables.py --check" in line]
  assert any("tpu_vm.sh" in l for l in fast) and any("gpu.sh" in l for l in fast)
  for line in fast:
    argv = shlex.split(line.split("#")[0])
    if argv[0] == "python":
      argv[0] = sys.executable
    elif argv[0].startswith("launch/"):
      argv.insert(0, "bash")
    r = run(argv, timeout=60)
    assert r.returncode == 0, f"{line}: exit {r.returncode}: {r.stderr.strip()[-300:]}"


def test_make_targets_shown_exist():
  makefile = read(os.path.join(ROOT, "Makefile"))
  for _, block in code_blocks():
    for target in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", block):
      assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target}: no such target"


def test_paths_the_pages_name_exist():
  # A file of this repository named in backticks (`configs/quality.py`, `benchmarks/compare.py`, ...).
  missing = set()
  pattern = r"`((?:configs|benchmarks|experiments|launch|tests|minilm_jax|docs)/[\w./-]*[\w/])`"
  for page in PAGES:
    for path in re.findall(pattern, read(page)):
      if "*" not in path and not os.path.exists(os.path.join(ROOT, path)):
        missing.add(f"{os.path.relpath(page, ROOT)}: {path}")
  assert not missing, sorted(missing)
