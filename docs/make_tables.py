"""Every results and performance table in README.md and docs/*.md, made from the JSON beside the pages.

  python docs/make_tables.py            # rewrite every table between its markers
  python docs/make_tables.py --check    # change nothing; exit 1 and show the diff if a page differs

A table sits between two markers in a page:

  <!-- table:NAME -->
  ... (written by this script: do not edit) ...
  <!-- /table:NAME -->

NAME is either one of RENDERERS below, each made from the JSON a command wrote (minilm-eval's
results.json, minilm-compile's JSON lines, the benchmarks' JSON lines), or FILE.KEY: table KEY of
docs/results/transcribed/FILE.json, whose cells were transcribed from the README of an earlier commit
because the run's own output was not kept (the file and the caption under the table say so). The same
NAME may appear in several pages (README.md and a docs page); each copy is rendered alike. The
evaluation's tables use minilm_jax.evaluation.report (no JAX); the test suite runs --check.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import glob
import json
import os
import re
import sys

from minilm_jax.evaluation import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
MARKER = re.compile(r"<!-- table:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)


def pages() -> list[str]:
  """README.md and every Markdown page under docs/ (absolute paths)."""
  return [os.path.join(ROOT, "README.md")] + sorted(
      glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def _link(page: str, target: str) -> str:
  """A Markdown link from `page` to the file `target`, relative, as the link check resolves it."""
  rel = os.path.relpath(target, os.path.dirname(page)).replace(os.sep, "/")
  return f"[{os.path.relpath(target, ROOT).replace(os.sep, '/')}]({rel})"


def markdown_table(columns, rows) -> str:
  line = lambda cells: "| " + " | ".join(cells) + " |"
  return "\n".join([line(columns), line(["---"] * len(columns))] + [line(r) for r in rows])


# ---- transcribed tables: docs/results/transcribed/FILE.json --------------------------------------------

def transcribed(name: str, page: str) -> str:
  file, key = name.split(".", 1)
  path = os.path.join(RESULTS, "transcribed", f"{file}.json")
  with open(path) as f:
    doc = json.load(f)
  t = doc["tables"][key]
  assert all(len(r) == len(t["columns"]) for r in t["rows"]), f"{name}: a row of the wrong length"
  note = f"; {t['note']}" if t.get("note") else ""
  return (markdown_table(t["columns"], t["rows"]) + "\n\n"
          f"<sub>{doc['source'][0].upper() + doc['source'][1:]}{note}; first recorded in commit "
          f"{t['recorded_in']} ({t['recorded_on']}). Data: {_link(page, path)} (`{key}`).</sub>")


# ---- minilm-compile: docs/results/compile_recipes.jsonl (benchmarks/compile_recipes.py) -----------------

COMPILE_RECIPES = os.path.join(RESULTS, "compile_recipes.jsonl")


def load_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def compile_recipes_table(results: dict) -> str:
  """The table of every recipe compiled for its target, from {config name: minilm-compile report}."""
  est = lambda v, fmt: fmt.format(v) if v is not None else "—"
  rows = ["| recipe | target | batch × T | memory per chip | HBM spare | compiler's step | tokens/s | MFU "
          "| whole budget |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name in sorted(results):
    r = results[name]
    budget = (f"{r['budget_hours']:.3g} h, {r['budget_chip_hours']:.3g} chip-h"
              if r["budget_hours"] is not None else "—")
    rows.append(f"| `{name}` | {r['target']} ({r['devices']}× {r['device_kind']}) | "
                f"{r['batch_size']} × {r['seq']} | {r['memory_per_device_bytes'] / 2**30:.2f} of "
                f"{r['hbm_bytes'] / 2**30:.0f} GiB | {r['hbm_spare']:.0%} | "
                f"{est(r['step_seconds_estimate'] and 1e3 * r['step_seconds_estimate'], '{:.1f} ms')} | "
                f"{est(r['tokens_per_s_estimate'], '{:,.0f}')} | {est(r['mfu_estimate'], '{:.2f}')} | "
                f"{budget} |")
  return "\n".join(rows)


def compile_recipes(page: str) -> str:
  results = {r["config"]: r for r in load_jsonl(COMPILE_RECIPES)}
  commits = sorted({r["commit"] for r in results.values()})
  return (compile_recipes_table(results) + "\n\n"
          f"<sub>Made from {_link(page, COMPILE_RECIPES)}, the `minilm-compile` reports that "
          f"`python benchmarks/compile_recipes.py` wrote at commit {', '.join(commits)}.</sub>")


# ---- the BERT-base step on its targets: docs/results/compile_bert_base.jsonl (compile_recipes.py --bert-base)

COMPILE_BERT_BASE = os.path.join(RESULTS, "compile_bert_base.jsonl")


def _bert_base_runs() -> list[dict]:
  return load_jsonl(COMPILE_BERT_BASE)


def _compile_caption(page: str, runs: list[dict]) -> str:
  commits = sorted({r["commit"] for r in runs})
  return (f"<sub>Made from {_link(page, COMPILE_BERT_BASE)}, the `minilm-compile` reports that "
          f"`python benchmarks/compile_recipes.py --bert-base` wrote at commit {', '.join(commits)}; each "
          f"row's command is in its `command` field.</sub>")


def _collectives(r: dict) -> str:
  """"all-reduce ×4 (3 async), ..." (reports before 44c8892 did not count the asynchronous ones)."""
  return ", ".join(f"{k} ×{v['count']}" + (f" ({v['async']} async)" if v.get("async") else "")
                   for k, v in sorted(r["collectives"].items()))


def compile_bert_base(page: str) -> str:
  runs = _bert_base_runs()
  rows = [[r["run"], f"{1e3 * r['step_seconds_estimate']:.1f} ms", f"{r['tokens_per_s_estimate']:,.0f}",
           f"{r['mfu_estimate']:.3f}", f"{r['memory_per_device_bytes'] / 2**30:.2f} of "
           f"{r['hbm_bytes'] / 2**30:.0f} GiB", f"{r['hbm_bytes_accessed_per_device'] / 1e9:.1f} GB",
           _collectives(r)] for r in runs]
  return (markdown_table(["target, T", "compiler's step", "tokens/s", "MFU", "memory per chip",
                          "HBM bytes per chip", "collectives"], rows) + "\n\n" + _compile_caption(page, runs))


def compile_bert_base_traffic(page: str) -> str:
  """The six largest entries of hlo.top_traffic for v4-32 at T = 128 and 512, side by side."""
  runs = {r["run"]: r for r in _bert_base_runs()}
  a, b = runs["v4-32, T=128"]["top_traffic"][:6], runs["v4-32, T=512"]["top_traffic"][:6]
  cell = lambda e: [f"`{e[0]}`", f"{e[1] / 1e9:.2f}"]
  rows = [cell(x) + cell(y) for x, y in zip(a, b)]
  return (markdown_table(["v4-32, T=128: program source", "GB", "v4-32, T=512: program source", "GB"], rows)
          + "\n\n" + _compile_caption(page, list(runs.values())))


# ---- what moved the BERT-base step: docs/results/compile_history.jsonl (experiments/compile_history.py)

COMPILE_HISTORY = os.path.join(RESULTS, "compile_history.jsonl")


def compile_history(page: str) -> str:
  """One row per commit: its change (the label or subject stored) and the step at T = 128 and 512."""
  runs = load_jsonl(COMPILE_HISTORY)
  commits = list(dict.fromkeys(r["commit"] for r in runs))
  cell = lambda r: f"{1e3 * r['step_seconds_estimate']:.1f} ms, MFU {r['mfu_estimate']:.3f}"
  rows = []
  for c in commits:
    by_seq = {r["seq"]: r for r in runs if r["commit"] == c}
    rows.append([c, by_seq[128]["subject"], cell(by_seq[128]), cell(by_seq[512])])
  table = markdown_table(["commit", "change", "v4-32, T=128", "v4-32, T=512"], rows)
  return (table + "\n\n" + f"<sub>Made from {_link(page, COMPILE_HISTORY)}, which "
          "`python experiments/compile_history.py` wrote: each commit's own minilm-compile, run in a "
          "worktree of it; each row's command is in its `command` field.</sub>")


# ---- the step against its PyTorch peers on this CPU: docs/results/compare.jsonl (benchmarks/compare.py --out)

COMPARE = os.path.join(RESULTS, "compare.jsonl")
COMPARE_XEON = os.path.join(RESULTS, "compare_xeon.jsonl")
CPU_PEERS = [("AMD EPYC", COMPARE), ("Intel Xeon", COMPARE_XEON)]  # the project's CPU machine, by date
PEER_NAMES = {"minilm_jax": "minilm_jax", "minilm_jax_one_device": "minilm_jax on one XLA:CPU device",
              "torch_eager": "PyTorch eager peer",
              "torch_compile": "PyTorch peer under `torch.compile`"}


def _made_by(page: str, path: str, summary: dict) -> str:
  return (f"Made from {_link(page, path)}, which `{summary['command']}` wrote on {summary['date']} at "
          f"commit {summary['commit']}")


def _peer_runs(path: str):
  """compare.py's file: (its summary, [(impl, name, "min-max tokens/s", MFU of the best round)] for each
  impl it ran, in PEER_NAMES' order)."""
  lines = load_jsonl(path)
  summary = next(r for r in lines if r["impl"] == "summary")
  runs = []
  for impl, name in PEER_NAMES.items():
    tokens = [r["tokens_per_s"] for r in lines if r["impl"] == impl]
    if tokens:
      runs.append((impl, name, f"{min(tokens):,.0f}-{max(tokens):,.0f}", f"{summary[f'{impl}_mfu']:.2f}"))
  return summary, runs


def compare_peers(page: str, path: str = COMPARE) -> str:
  summary, runs = _peer_runs(path)
  rows = [[name, tokens, mfu, "" if impl == "minilm_jax" else f"{summary[f'speedup_over_{impl}']:.2f}×"]
          for impl, name, tokens, mfu in runs]
  return (markdown_table(["impl", "tokens/s (min-max of the rounds)", "MFU (best round)",
                          "minilm_jax's best round over this one's"], rows) + "\n\n"
          f"<sub>{_made_by(page, path, summary)} (MFU against the peak measured in the same run, "
          f"{summary['peak_flops_per_s'] / 1e9:.0f} GFLOP/s).</sub>")


# ---- the step's matmuls alone: experiments/matmul_ceiling.py --out ------------------------------------------

MATMUL_CEILING = os.path.join(RESULTS, "matmul_ceiling.jsonl")


def matmul_ceiling(page: str, path: str = MATMUL_CEILING) -> str:
  """One row per matmul shape of the step: GFLOP/s under XLA:CPU on every core, pinned to one, and torch's;
  then the sum of their times and the MFU ceiling it sets."""
  lines = {r["run"]: r for r in load_jsonl(path)}
  every, one, summary = lines["all cores"], lines["one core"], lines["summary"]
  shape = lambda a: "[" + ", ".join(map(str, a)) + "]"
  rows = [[name, f"{shape(a)} × {shape(b)}", str(count), f"{every['gflops'][name]:.0f}",
           f"{one['gflops'][name]:.0f}", f"{every['torch_gflops'][name]:.0f}"]
          for name, (a, b, count) in every["shapes"].items()]
  rows.append(["all of them, summed: time", "", "", f"{every['jax_matmul_ms']:,.0f} ms",
               f"{one['jax_matmul_ms']:,.0f} ms", f"{every['torch_matmul_ms']:,.0f} ms"])
  rows.append(["the most MFU a step of these kernels can reach", "", "", f"{every['jax_mfu_ceiling']:.2f}",
               "", f"{every['torch_mfu_ceiling']:.2f}"])
  return (markdown_table(["matmul of the step", "a × b", "count",
                          f"XLA:CPU GFLOP/s ({every['cores']} cores)", "XLA:CPU GFLOP/s (pinned to one core)",
                          f"torch (MKL) GFLOP/s ({every['cores']} cores)"], rows) + "\n\n"
          f"<sub>{_made_by(page, path, summary)} (each shape jitted alone, the best of its --reps calls, 5 unless given; the MFU "
          f"ceiling against the peak measured in the same run, {every['peak_flops_per_s'] / 1e9:.0f} "
          "GFLOP/s).</sub>")


# ---- the step and the relation loss on CPU: benchmarks/long_steps.py, benchmarks/relation_kl.py ----------

LONG_STEPS = os.path.join(RESULTS, "long_steps.jsonl")
RELATION_KL = os.path.join(RESULTS, "relation_kl.jsonl")


def _spread(values, fmt) -> str:
  """min-max of `values` formatted, one value when they agree."""
  lo, hi = fmt(min(values)), fmt(max(values))
  return lo if lo == hi else f"{lo}-{hi}"


def long_steps(page: str, path: str = LONG_STEPS, rows_shown=None) -> str:
  """One row per (shape, relation loss): tokens/s and step (min-max over rounds), MFU of the best round,
  XLA's memory analysis of the compiled step; `rows_shown`: only those of long_steps.ROWS (indices)."""
  lines = load_jsonl(path)
  summary = next(r for r in lines if r["row"] == "summary")
  runs = [r for r in lines if r["row"] != "summary" and (rows_shown is None or r["row"] in rows_shown)]
  rows = []
  for i in sorted({r["row"] for r in runs}):
    mine = [r for r in runs if r["row"] == i]
    memory = mine[0].get("compiled_memory_bytes", mine[0].get("peak_memory_bytes"))
    timed = [r for r in mine if "tokens_per_s" in r]
    cells = (["", "", ""] if not timed else
             [_spread([r["tokens_per_s"] for r in timed], lambda v: f"{v:,.0f}"),
              _spread([r["step_ms"] / 1e3 for r in timed], lambda v: f"{v:.1f}") + " s",
              f"{max(timed, key=lambda r: r['tokens_per_s'])['mfu']:.2f}"])
    rows.append([mine[0]["shape"], mine[0]["relation_loss"], *cells, f"{memory / 1e9:.1f} GB"])
  peaks = [r["peak_flops_per_s"] / 1e9 for r in runs if "peak_flops_per_s" in r]
  return (markdown_table(["shape", "relation loss", "tokens/s", "step", "MFU (best round)", "memory"], rows)
          + "\n\n" + f"<sub>{_made_by(page, path, summary)}: {summary['rounds']} rounds, min-max over them "
          f"(one compile for the compile-only row); each run's MFU against the peak measured in that run, "
          f"{_spread(peaks, lambda v: f'{v:.0f}')} GFLOP/s; memory: XLA's memory analysis of the compiled "
          "step.</sub>")


def relation_kl(page: str, path: str = RELATION_KL) -> str:
  """One row per T: each path's median time (min-max) and compiled memory, or "not run" past the limit."""
  lines = load_jsonl(path)
  summary = next(r for r in lines if r["path"] == "summary")
  runs = [r for r in lines if r["path"] != "summary"]
  paths = list(dict.fromkeys(r["path"] for r in runs))
  rows = []
  for seq in sorted({r["seq"] for r in runs}):
    cell = {r["path"]: r for r in runs if r["seq"] == seq}
    fmt = lambda r: (f"not run: {r['memory_gb']:.1f} GiB" if r["ms_median"] is None else
                     f"{r['ms_median'] / 1e3:.2f} s ({r['ms_min'] / 1e3:.2f}-{r['ms_max'] / 1e3:.2f}), "
                     f"{r['memory_gb']:.2f} GiB")
    rows.append([f"{seq} ({cell[paths[0]]['batch']})", *(fmt(cell[p]) for p in paths)])
  reps = max(r["reps"] for r in runs)
  return (markdown_table(["T (batch)", *paths], rows) + "\n\n" + f"<sub>{_made_by(page, path, summary)}: "
          f"median of {reps} runs (min-max), and XLA's memory analysis of the compiled function.</sub>")


ROUTES_STEP = os.path.join(RESULTS, "routes_step.jsonl")


def routes_step(page: str, path: str = ROUTES_STEP) -> str:
  """One row per XLA:CPU route: the metric's median (min-max) over rounds, against the default route's
  median, and whether the check key matched the default's (benchmarks/routes.py's own summary)."""
  lines = load_jsonl(path)
  summary = next(r for r in lines if r.get("route") == "summary")
  rows = []
  for route, row in summary["routes"].items():
    spread = row["spread"]
    cell = "" if not spread else f"{spread[1]:,.0f} ({spread[0]:,.0f}-{spread[2]:,.0f})"
    ratio = f"{row['vs_default']:.2f}×" if "vs_default" in row else ""
    if row.get("failed"):
      check = f"failed {row['failed']} of {row['runs']}: {row['error']}"
    elif row.get("check_rel_diff") is None:
      check = ""
    else:
      check = f"{'ok' if row['correct'] else 'WRONG'} ({row['check_rel_diff']:.1e})"
    rows.append([f"`{route}`", cell, ratio, check])
  load = f"load average {', '.join(summary['load_before'])} before, {', '.join(summary['load_after'])} after"
  return (markdown_table(["route", f"{summary['metric']}, median (min-max)", "against the default",
                          f"{summary['check']} against the default's (rel. diff)"], rows) + "\n\n"
          + f"<sub>{_made_by(page, path, summary)}: {summary['rounds']} rounds, the routes alternating; "
          f"{load}.</sub>")


# ---- the data path: benchmarks/data_scale.py -----------------------------------------------------------

DATA_THROUGHPUT = os.path.join(RESULTS, "data_throughput.jsonl")
DATA_MEMORY = os.path.join(RESULTS, "data_memory.jsonl")


def data_throughput(page: str, path: str = DATA_THROUGHPUT) -> str:
  """Tokenising one file with 1, 2, ... processes: tokens/s, per process and the speed-up over the first
  count in the same round (min-max over rounds)."""
  lines = load_jsonl(path)
  summary = next(r for r in lines if r.get("summary"))
  runs = [r for r in lines if not r.get("summary")]
  procs = list(dict.fromkeys(r["procs"] for r in runs))
  first = {r["round"]: r["tokens_per_s"] for r in runs if r["procs"] == procs[0]}
  rows = []
  for p in procs:
    mine = [r for r in runs if r["procs"] == p]
    speedup = [r["tokens_per_s"] / first[r["round"]] for r in mine]
    rows.append([f"{p} process{'es' if p > 1 else ''}",
                 _spread([r["tokens_per_s"] for r in mine], lambda v: f"{v:,.0f}"),
                 _spread([r["tokens_per_s_per_proc"] for r in mine], lambda v: f"{v:,.0f}"),
                 _spread(speedup, lambda v: f"{v:.2f}") + "×"])
  r0 = runs[0]
  what = (f"tokenising {summary['source_bytes'] / 2**20:,.0f} MiB of text ({r0['tokens'] / 1e6:.1f}M tokens, "
          f"{r0['shards']} shards), all-MiniLM-L6-v2's tokenizer")
  rounds = len({r["round"] for r in runs})
  return (markdown_table([what, f"tokens/s ({rounds} rounds)", "per process", "speed-up"], rows) + "\n\n"
          + f"<sub>{_made_by(page, path, summary)}: min-max over the rounds.</sub>")


def data_memory(page: str, path: str = DATA_MEMORY) -> str:
  """A short demo run over the demo corpus and over a large file: peak resident memory and time."""
  lines = load_jsonl(path)
  summary = next(r for r in lines if r.get("summary"))
  small, large = [r for r in lines if not r.get("summary")]
  size = f"{large['source_bytes']:,} bytes" if large.get("source_bytes") else "?"
  rows = [[f"over the {small['run']}", f"{small['peak_rss_mb']:,.0f} MB",
           f"{small['secs'] / 60:.1f} min"],
          [f"over `{large['run']}` ({size})",
           f"{large['peak_rss_mb']:,.0f} MB: **{large['peak_rss_mb'] - small['peak_rss_mb']:+,.0f} MB**",
           f"{large['secs'] / 60:.1f} min"]]
  what = f"a short run (`configs/demo.py`, {small['steps']} steps, tokenisation included)"
  return (markdown_table([what, "peak resident memory", "time"], rows) + "\n\n"
          + f"<sub>{_made_by(page, path, summary)}: one run each; the largest of minilm-distill and its "
          f"tokenising processes (getrusage of the children).</sub>")


# ---- minilm-eval: results.json as minilm-eval's own results.md lays it out --------------------------------

# The labels, model cell and number format are minilm_jax.evaluation.report's own (it loads without JAX),
# so a page's table reads as minilm-eval's results.md does.


def eval_models_table(doc: dict) -> str:
  results, seeds = doc["results"], doc["settings"]["protocol"]["seeds"]
  metrics = report.metrics_of(results)
  head = [report.label(m) + (" (± SE)" if not report.is_finetune(m) else f" (± sd, {seeds} seeds)") for m in metrics]
  rows = [[report.made_of(name, row), f"{row['layers']}×{row['hidden']}, {row['params_M']:.1f}M params",
           *[report.fmt(row[m]) if m in row else "" for m in metrics]] for name, row in results.items()]
  return markdown_table(["model", "size", *head], rows)


def eval_differences_table(doc: dict) -> str:
  diffs, metrics = doc["differences"], report.metrics_of(doc["results"])
  cols = [m for m in metrics if any(m in row for row in diffs.values())]
  rows = [[name, *[report.fmt_difference(row[m]) if m in row else "" for m in cols]] for name, row in diffs.items()]
  return markdown_table(["difference", *[report.label(m) for m in cols]], rows)


def _eval_run(folder: str):
  """(results.json, its provenance) of a stored minilm-eval output under docs/results/FOLDER/."""
  with open(os.path.join(RESULTS, folder, "results.json")) as f:
    doc = json.load(f)
  with open(os.path.join(RESULTS, folder, "provenance.json")) as f:
    return doc, json.load(f)


def _eval_caption(page: str, folder: str, prov: dict) -> str:
  return (f"<sub>Made from {_link(page, os.path.join(RESULTS, folder, 'results.json'))}, which "
          f"`{prov['eval_command']}` wrote on {prov['date']} at commit {prov['commit']} ({prov['machine']}; "
          f"provenance: {_link(page, os.path.join(RESULTS, folder, 'provenance.json'))}).</sub>")


def _eval_models(page: str, folder: str) -> str:
  doc, prov = _eval_run(folder)
  return eval_models_table(doc) + "\n\n" + _eval_caption(page, folder, prov)


def _eval_differences(page: str, folder: str) -> str:
  doc, prov = _eval_run(folder)
  return (eval_differences_table(doc) + "\n\n<sub>Paired over the same items, ± the SE of the difference, "
          "and the difference in SEs; from the same results.json.</sub>")


# The demo run's stored evaluations, one a held-out text: (folder under docs/results/, the text).
DEMO_TEXTS = [("demo", "the stdlib corpus's held-out split (the default)"),
              ("demo_fortunes", "fortune cookies (Debian's `fortunes`: quotations, literature, dialogue)"),
              ("demo_kjv", "the King James Bible, a chapter a document (Debian's `bible-kjv`)"),
              ("demo_other", "licence texts, release notes, Perl documentation (`benchmarks/other_text.py`)"),
              ("demo_book", "the Rust book (`benchmarks/other_text.py --source rust-book`)")]
# The demo until 2026-12-06 (started from every 2nd teacher layer), on the first three of those texts.
DEMO_EVERY2_TEXTS = [("demo_every2", DEMO_TEXTS[0][1]), ("demo_every2_fortunes", DEMO_TEXTS[1][1]),
                     ("demo_every2_kjv", DEMO_TEXTS[2][1])]


def _quality_texts(folder: str) -> list[tuple[str, str]]:
  """The quality recipe's four texts (the default, the fortune cookies, the Bible, the Rust book): FOLDER,
  FOLDER_fortunes, FOLDER_kjv and FOLDER_book with their descriptions."""
  return [(folder + suffix, DEMO_TEXTS[i][1]) for suffix, i in (("", 0), ("_fortunes", 1), ("_kjv", 2),
                                                                 ("_book", 4))]


# The quality default's run (configs/quality.py, workdirs/quality_l4), evaluated zero-shot.
QUALITY_TEXTS = _quality_texts("quality_l4")
# The quality recipe from the best start and the default, one minilm-eval table a text (the default text's with fine-tuning).
QUALITY_STARTS = _quality_texts("quality_starts")
# The best start's seeds 0 and 1 with the default, one zero-shot minilm-eval table a text.
QUALITY_SEEDS = _quality_texts("quality_seeds")
# Every stored minilm-eval output that a page shows whole (docs/results/FOLDER/results.json).
EVAL_FOLDERS = [folder for folder, _ in DEMO_TEXTS + QUALITY_TEXTS] + ["demo_every2", "quality_starts"]
DEMO_STUDENT, BEST_SUBSET = "student: demo", "baseline: best layer subset"


def _lowest_baseline(results: dict) -> tuple[float, str]:
  """(held-out relation loss, name) of the baseline whose loss is the lowest: the bar a student's is read against."""
  return min((v["heldout_relation_loss"]["value"], n) for n, v in results.items() if n.startswith("baseline"))


def _share(value: float, low: float, low_name: str) -> str:
  """A student's held-out relation loss as a share of the lowest baseline's, `34% of best layer subset's`;
  a baseline made of the teacher's own layers up to the one matched has loss 0, and no share."""
  name = low_name.removeprefix("baseline: ")
  return f"{value / low:.0%} of {name}'s" if low > 0 else f"{name}': 0, the teacher's own layers up to the one matched"


def _diff_cell(diff: dict, digits: int) -> str:
  """A paired difference as `+0.016 (+2.3)`: the value, then (in SEs)."""
  return f"{diff['value']:+.{digits}f} ({diff['z']:+.1f})"


def _sources(page: str, texts: list[tuple[str, str]], provs: list[dict]) -> str:
  """The caption's start for tables made from several stored evaluations: their files and commits."""
  files = [_link(page, os.path.join(RESULTS, folder, "results.json")) for folder, _ in texts]
  when = "; ".join(sorted({f"commit {p['commit']}, {p['date']}" for p in provs}))
  return (f"<sub>Made from {', '.join(files[:-1])} and {files[-1]} (minilm-eval's output at {when}; each "
          "command is in the provenance.json beside its file).")


def _best_subsets(page: str, texts: list[tuple[str, str]], student: str = DEMO_STUDENT) -> str:
  """Per held-out text: the best layer subset's teacher layers, it and the student on the zero-shot
  probes with their paired difference, and the student's held-out relation loss against the lowest of
  the baselines'."""
  rows, provs = [], []
  for folder, text in texts:
    doc, prov = _eval_run(folder)
    provs.append(prov)
    r, best = doc["results"], doc["best_subset"]
    d = doc["differences"][f"{student} − {BEST_SUBSET}"]
    low, low_name = _lowest_baseline(r)
    loss = r[student]["heldout_relation_loss"]
    same = f" (= {best['same_as'].removeprefix('baseline: ')})" if best["same_as"] else ""
    rows.append([text, ", ".join(map(str, best["layers"])) + same,
                 report.fmt(r[BEST_SUBSET]["retrieval_mrr"]), report.fmt(r[student]["retrieval_mrr"]),
                 report.fmt_difference(d["retrieval_mrr"]),
                 report.fmt(r[BEST_SUBSET]["agreement"]), report.fmt(r[student]["agreement"]), report.fmt_difference(d["agreement"]),
                 f"{report.fmt(loss)} ({_share(loss['value'], low, low_name)})"])
  return (markdown_table(["held-out text", "best layer subset (teacher layers)", "best subset: retrieval MRR",
                          "student: retrieval MRR", "student − best subset", "best subset: agreement",
                          "student: agreement", "student − best subset",
                          "student: held-out relation loss (of the best baseline's)"], rows) + "\n\n"
          + _sources(page, texts, provs) + " Differences paired over the same items, ± the "
          "SE of the difference, and in SEs; the best baseline is the one with the lowest held-out relation "
          "loss. Every model and every pair of a text are in its results.json.</sub>")


def demo_best_subsets(page: str) -> str:
  return _best_subsets(page, DEMO_TEXTS)


def demo_every2_best_subsets(page: str) -> str:
  return _best_subsets(page, DEMO_EVERY2_TEXTS)


def quality_best_subsets(page: str) -> str:
  return _best_subsets(page, QUALITY_TEXTS, student="student: quality_l4")


# The start study (issue 38): the demo config from each start, three seeds each, trained into workdirs
# named RECIPE_seedN and evaluated in one minilm-eval table (one set of baselines): (RECIPE, its row label).
DEMO_START = "demo_start"
DEMO_START_RECIPES = [
    ("every2", "every 2nd layer (0, 2, 4), relations + embedding (the demo's recipe until 2026-12-06)"),
    ("best", "the best subset (`student.init=best`), relations + embedding"),
    ("best_emb2", "the best subset, relations + 2 × embedding (`loss.term_weights=(1,2)`)"),
    ("best_layer5", "the best subset, relations of teacher layer 5 of 6 (`loss.teacher_layer=5`) + embedding"),
]


def _start_study(page: str, folder: str) -> str:
  """Per start (recipe) and seed: retrieval and agreement, each student's paired difference with the
  best layer subset, and its held-out relation loss against the lowest of the baselines'."""
  doc, prov = _eval_run(folder)
  r, diffs = doc["results"], doc["differences"]
  low, low_name = _lowest_baseline(r)
  rows = []
  for recipe, label in DEMO_START_RECIPES:
    names = sorted(n for n in r if re.fullmatch(rf"student: {recipe}_seed\d+", n))
    if not names:
      raise ValueError(f"{folder}/results.json has no student {recipe}_seedN")
    each = lambda f: " / ".join(f(n) for n in names)
    d = lambda n, m: diffs[f"{n} − {BEST_SUBSET}"][m]
    rows.append([label, ", ".join(n.rsplit("seed", 1)[1] for n in names),
                 " / ".join(dict.fromkeys(", ".join(map(str, r[n]["teacher_layers"])) for n in names)),
                 each(lambda n: f"{r[n]['retrieval_mrr']['value']:.3f}"),
                 each(lambda n: _diff_cell(d(n, "retrieval_mrr"), 3)),
                 each(lambda n: f"{r[n]['agreement']['value']:.3f}"),
                 each(lambda n: _diff_cell(d(n, "agreement"), 3)),
                 each(lambda n: f"{r[n]['heldout_relation_loss']['value'] / low:.0%}")])
  b = r[BEST_SUBSET]
  rows.append([f"{BEST_SUBSET} (no training)", "", ", ".join(map(str, b["teacher_layers"])),
               report.fmt(b["retrieval_mrr"]), "", report.fmt(b["agreement"]), "",
               f"{b['heldout_relation_loss']['value'] / low:.0%}"])
  return (markdown_table(["student's start and terms", "seeds", "started from teacher layers",
                          "retrieval MRR", "− best subset (in SE)", "agreement", "− best subset (in SE)",
                          f"held-out relation loss, of {low_name.removeprefix('baseline: ')}'s"], rows) + "\n\n"
          + _eval_caption(page, folder, prov)[:-len("</sub>")] + " Each cell lists the seeds in order; "
          "differences are paired over the same items, in the metric's units and (in SEs).</sub>")


def demo_start_study(page: str) -> str:
  return _start_study(page, DEMO_START)


# Several students on texts from outside, each text evaluated in one minilm-eval table: (folder under
# docs/results/, the text). The demo's seeds 0, 1, 2 (the demo run and two more); the demo against 4× its
# steps on the bigger pydocs corpus; the demo against its recipe on quotations from literature.
DEMO_SEEDS = [("demo_seeds_fortunes", DEMO_TEXTS[1][1]), ("demo_seeds_kjv", DEMO_TEXTS[2][1])]
DEMO_PYDOCS480 = [("demo_pydocs480_fortunes", DEMO_TEXTS[1][1]), ("demo_pydocs480_kjv", DEMO_TEXTS[2][1])]
DEMO_QUOTATIONS = [("demo_quotations_fortunes", DEMO_TEXTS[1][1]), ("demo_quotations_kjv", DEMO_TEXTS[2][1])]
# The demo, the quotations student in rows of 32, and the same on stdlib + quotations (one corpus folder).
DEMO_MIX = [("demo_mix", DEMO_TEXTS[0][1]), ("demo_mix_fortunes", DEMO_TEXTS[1][1]),
            ("demo_mix_kjv", DEMO_TEXTS[2][1])]
# The demo against rows of 32 and the "similarity" term on its own corpus (built at ea3bf3c, then removed).
DEMO_SIMILARITY = [("demo_similarity", DEMO_TEXTS[0][1]), ("demo_similarity_fortunes", DEMO_TEXTS[1][1]),
                   ("demo_similarity_kjv", DEMO_TEXTS[2][1])]


def _students_vs_best(page: str, texts: list[tuple[str, str]], which: str) -> str:
  """Per text: the best layer subset, and for each student its paired difference with it on the zero-shot
  probes and its held-out relation loss against the lowest of the baselines'. which: the students, in
  the caption."""
  rows, provs = [], []
  for folder, text in texts:
    doc, prov = _eval_run(folder)
    provs.append(prov)
    r, diffs = doc["results"], doc["differences"]
    names = [n for n in r if n.startswith("student: ")]
    low, low_name = _lowest_baseline(r)
    each = lambda f: " / ".join(f(n) for n in names)
    d = lambda n, m: diffs[f"{n} − {BEST_SUBSET}"][m]
    rows.append([text, ", ".join(map(str, doc["best_subset"]["layers"])),
                 each(lambda n: _diff_cell(d(n, "retrieval_mrr"), 4)),
                 each(lambda n: _diff_cell(d(n, "agreement"), 4)),
                 each(lambda n: f"{r[n]['heldout_relation_loss']['value'] / low:.0%}") + f" of {low_name.removeprefix('baseline: ')}'s"])
  return (markdown_table(["held-out text", "best layer subset", "student − best subset: retrieval MRR (in SE)",
                          "student − best subset: agreement (in SE)", "student: held-out relation loss"], rows)
          + "\n\n" + _sources(page, texts, provs) + f" Each cell lists {which}; differences are paired over "
          "the same items, in the metric's units and (in SEs).</sub>")


def quality_starts_vs_best(page: str) -> str:
  return _students_vs_best(page, QUALITY_STARTS, "the best start / the default (first 4 layers); the held-out "
                           "relation loss is against the last layer, which only the best start was trained on")


def quality_seeds_vs_best(page: str) -> str:
  return _students_vs_best(page, QUALITY_SEEDS, "the best start's seed 0 / its seed 1 / the default (first 4 "
                           "layers); the held-out relation loss is against the last layer, which only the best "
                           "start was trained on")


def demo_seeds(page: str) -> str:
  return _students_vs_best(page, DEMO_SEEDS, "seeds 0 / 1 / 2 (seed 0 is the demo run)")


def demo_pydocs480(page: str) -> str:
  return _students_vs_best(page, DEMO_PYDOCS480, "the demo / 480 steps on pydocs")


def demo_similarity(page: str) -> str:
  return _students_vs_best(page, DEMO_SIMILARITY, "the demo / in rows of 32 tokens, 128 a batch / with the "
                           "`similarity` term / both")


def demo_quotations(page: str) -> str:
  return _students_vs_best(page, DEMO_QUOTATIONS, "the demo (on the stdlib corpus) / the demo's recipe on the "
                           "dictionary's quotations / the same in rows of 32 tokens, 128 a batch")


def demo_mix(page: str) -> str:
  return _students_vs_best(page, DEMO_MIX, "the demo (stdlib corpus) / the quotations student in rows of 32 / "
                           "the same recipe on stdlib + quotations, 120 steps / the same, 240 steps")


# ---- README: the recipes, with their targets and costs from the minilm-compile reports ---------------------

def _rel(page: str, path: str) -> str:
  """`path` (from the repository root, maybe with #anchor) as a link target relative to `page`."""
  file, _, anchor = path.partition("#")
  if os.path.join(ROOT, file) == page and anchor:
    return f"#{anchor}"
  rel = os.path.relpath(os.path.join(ROOT, file), os.path.dirname(page)).replace(os.sep, "/")
  return rel + (f"#{anchor}" if anchor else "")


# (config, teacher → student, where it runs when not on its compile target, its time there, what it
# reaches). The time of a recipe without a CPU time is its whole token budget on its target by the
# compiler's estimate (docs/results/compile_recipes.jsonl). The CPU times are the configs' docstrings'.
README_CONFIGS = [
    ("demo", "all-MiniLM-L6-v2 (6×384) → 3×384, 0.49M tokens of the stdlib corpus", "CPU, offline",
     "4-6 min on 2 cores, the evaluation 4-6 more",
     "ahead of every undistilled 3×384 student, the best layer subset included, on retrieval (+2.3 SE) and "
     "agreement (+13.1 SE) on its held-out text; level with the best subset on retrieval on four texts from "
     "outside ([Results](README.md#results))"),
    ("demo_ta", "all-MiniLM-L6-v2 → 6×192 assistant → 3×192", "CPU, offline", "about 8 min on 2 cores",
     "the relations passed down the chain ([history](docs/experiments.md#earlier-measurements-relations-"
     "only-the-first-protocol))"),
    ("quality", "all-MiniLM-L6-v2 → 4×384, 8.2M tokens of `pydocs`", "CPU", "70-85 min on 2 cores",
     "ahead of random init and the first 4 layers on retrieval and agreement on all four texts measured; "
     "behind the best layer subset, untrained, on retrieval on all four ([results](docs/results.md#against-"
     "the-best-layer-subset-on-four-texts-2026-12-07))"),
    ("v1_bert_base_6x768", "BERT-base → 6×768, MiniLM v1", None, None,
     "the paper: 80.4 average over 8 tasks (BERT-base 81.5)"),
    ("v1_bert_base_6x384", "BERT-base → 6×384, MiniLM v1", None, None,
     "the paper: 81.9 (SQuAD2/MNLI/SST-2 average)"),
    ("ta_bert_base_6x384", "BERT-base → 12×384 assistant → 6×384, MiniLM v1", None, None,
     "the paper: 82.1 (the same average)"),
    ("v2_bert_base_6x384", "BERT-base → 6×384, MiniLMv2, 48 relation heads", None, None, "not run here"),
    ("v2_bert_large_6x768", "BERT-large (layer 21 of 24) → 6×768, MiniLMv2", None, None, "not run here"),
    ("v2_roberta_large_6x384", "RoBERTa-large (layer 19 of 24) → 6×384, MiniLMv2", None, None,
     "not run here"),
    ("v2_modernbert_base_6x384", "ModernBERT-base → 6×384 ModernBERT, MiniLMv2", None, None,
     "not run here"),
]


def readme_configs(page: str) -> str:
  compiled = {r["config"]: r for r in load_jsonl(COMPILE_RECIPES)}
  configs = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                   if f.endswith(".py") and not f.startswith("_"))
  described = [c[0] for c in README_CONFIGS]
  if sorted(described) != configs:
    raise ValueError(f"README_CONFIGS names {sorted(described)}, configs/ holds {configs}: describe each")
  link = lambda text: re.sub(r"\]\(([^)]+)\)", lambda m: f"]({_rel(page, m.group(1))})", text)
  rows = []
  for name, shape, where, time, reaches in README_CONFIGS:
    r = compiled[name]
    target = f"{r['target']} ({r['devices']}× {r['device_kind']})"
    if where is None:
      where = target
      time = (f"{r['budget_hours']:.3g} h, {r['budget_chip_hours']:.3g} chip-h (compiler's estimate)"
              if r["budget_hours"] is not None else "—")
    else:
      where = f"{where}; target {target}"
    rows.append([f"`{name}`", shape, where, time, link(reaches)])
  return (markdown_table(["config", "teacher → student", "where it runs", "time", "what it reaches"], rows)
          + "\n\n" + f"<sub>Targets and estimates: {_link(page, COMPILE_RECIPES)}.</sub>")


# ---- README: the step's speed, from the performance tables -------------------------------------------------

def readme_performance(page: str) -> str:
  path = os.path.join(RESULTS, "transcribed", "performance.json")
  with open(path) as f:
    tables = json.load(f)["tables"]
  rows = []
  h200 = tables["h200"]
  made = []
  for cpu_name, file in CPU_PEERS:
    summary, runs = _peer_runs(file)
    cpu = f"2 cores of an {cpu_name}, {summary['date']}, 3 rounds"
    for _, name, tokens, mfu in runs:
      rows.append([cpu, f"{name}, float32, 32 × 128", tokens, mfu])
      cpu = "same"
    made.append(f"{_link(page, file)}, written by `{summary['command']}` at commit {summary['commit']}")
  gpu, batch = f"one NVIDIA H200, {h200['recorded_on']}", None
  cols = h200["columns"]
  for r in h200["rows"]:
    cell = dict(zip(cols, r))
    m = re.search(r"batch (\d+ × \d+)", cell["shape"])
    batch = m.group(1) if m else batch
    rows.append([gpu, f"minilm_jax, {cell['precision']}, {batch}", cell["tokens/s"], cell["MFU"]])
    gpu = "same"
  peers_link = _rel(page, "docs/performance.md#against-the-pytorch-peers")
  h200_link = _rel(page, "docs/performance.md#on-a-gpu-one-nvidia-h200")
  return (markdown_table(["machine", "step, precision, batch × T", "tokens/s", "MFU"], rows) + "\n\n"
          f"<sub>From the tables [Against the PyTorch peers]({peers_link}) (tokens/s: min-max of the "
          f"rounds; MFU: the best round's, against the peak measured in the same run; data "
          f"{'; '.join(made)}) and "
          f"[On a GPU: one NVIDIA H200]({h200_link}) (one run each; MFU against the published bf16 peak; data "
          f"{_link(page, path)}: transcribed, the runs' own output was not kept).</sub>")


RENDERERS = {
    # Each stored minilm-eval output: its models table (FOLDER) and its paired differences (FOLDER_differences).
    **{folder: functools.partial(_eval_models, folder=folder) for folder in EVAL_FOLDERS},
    **{f"{folder}_differences": functools.partial(_eval_differences, folder=folder) for folder in EVAL_FOLDERS},
    "compare_peers": compare_peers,
    "compare_peers_xeon": functools.partial(compare_peers, path=COMPARE_XEON),
    "compile_bert_base": compile_bert_base,
    "compile_bert_base_traffic": compile_bert_base_traffic,
    "compile_history": compile_history,
    "compile_recipes": compile_recipes,
    "data_memory": data_memory,
    "data_throughput": data_throughput,
    "long_steps": long_steps,
    "long_steps_modernbert": functools.partial(long_steps, rows_shown=(5,)),
    "relation_kl": relation_kl,
    "routes_step": routes_step,
    "demo_best_subsets": demo_best_subsets,
    "demo_every2_best_subsets": demo_every2_best_subsets,
    "quality_best_subsets": quality_best_subsets,
    "quality_starts_vs_best": quality_starts_vs_best,
    "quality_seeds_vs_best": quality_seeds_vs_best,
    "demo_pydocs480": demo_pydocs480,
    "demo_quotations": demo_quotations,
    "demo_mix": demo_mix,
    "demo_similarity": demo_similarity,
    "demo_seeds": demo_seeds,
    "demo_start_study": demo_start_study,
    "readme_configs": readme_configs,
    "readme_performance": readme_performance,
    "matmul_ceiling": matmul_ceiling,
}


# ---- the pages ------------------------------------------------------------------------------------------

def render(name: str, page: str) -> str:
  if "." in name:
    return transcribed(name, page)
  if name not in RENDERERS:
    raise KeyError(f"{os.path.relpath(page, ROOT)}: no table named {name!r} (RENDERERS, or FILE.KEY of "
                   "docs/results/transcribed/FILE.json)")
  return RENDERERS[name](page)


def regenerate(text: str, page: str) -> str:
  """The page with every table between its markers made again."""
  opened = re.findall(r"<!-- table:([\w.-]+) -->", text)
  closed = re.findall(r"<!-- /table:([\w.-]+) -->", text)
  if opened != closed:
    raise ValueError(f"{os.path.relpath(page, ROOT)}: unbalanced table markers: {opened} against {closed}")
  return MARKER.sub(lambda m: (f"<!-- table:{m['name']} -->\n{render(m['name'], page)}\n"
                               f"<!-- /table:{m['name']} -->"), text)


def tables_in(text: str) -> list[str]:
  return [m["name"] for m in MARKER.finditer(text)]


def stale() -> list[tuple[str, str, str]]:
  """(page, its text, the text with its tables made again) for every page whose tables are not current."""
  out = []
  for page in pages():
    with open(page) as f:
      old = f.read()
    new = regenerate(old, page)
    if new != old:
      out.append((page, old, new))
  return out


def check() -> list[str]:
  """A unified diff for every page whose tables are not what the JSON makes (empty: all current)."""
  diff = lambda name, old, new: "".join(difflib.unified_diff(
      old.splitlines(True), new.splitlines(True), name, f"{name} (made from the JSON)"))
  return [diff(os.path.relpath(page, ROOT), old, new) for page, old, new in stale()]


def write() -> list[str]:
  """Rewrite every page's tables; returns the pages that changed."""
  changed = stale()
  for page, _, new in changed:
    with open(page + ".tmp", "w") as f:
      f.write(new)
    os.replace(page + ".tmp", page)
  return [os.path.relpath(page, ROOT) for page, _, _ in changed]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page's table differs "
                 "from what its JSON makes, and print the difference")
  args = p.parse_args(argv)
  if args.check:
    diffs = check()
    for d in diffs:
      sys.stdout.write(d)
    if diffs:
      print(f"{len(diffs)} page(s) differ from their JSON: run python docs/make_tables.py", file=sys.stderr)
    return 1 if diffs else 0
  changed = write()
  print("\n".join(f"rewrote {c}" for c in changed) or "every table is current")
  return 0


if __name__ == "__main__":
  sys.exit(main())
