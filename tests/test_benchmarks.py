"""benchmarks/: what a benchmark writes with --out is what docs/make_tables.py makes its table from
(benchmarks/record.py's lines end with the date, the commit and the command)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "docs"))
import long_steps  # noqa: E402
import make_tables  # noqa: E402
import record  # noqa: E402

PAGE = os.path.join(ROOT, "docs", "performance.md")


def test_record_writes_whole_lines_and_the_provenance(tmp_path):
  path = str(tmp_path / "out.jsonl")
  prov = record.provenance("benchmarks/x.py", ["--reps", "2"])
  assert prov["command"] == "python benchmarks/x.py --reps 2"
  git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()
  dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  assert prov["commit"] == git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
  record.write_jsonl(path, [{"a": 1}, {"b": "two"}])
  assert make_tables.load_jsonl(path) == [{"a": 1}, {"b": "two"}]
  assert os.listdir(tmp_path) == ["out.jsonl"]  # no .tmp left behind


def test_relation_kl_writes_what_its_table_is_made_from(tmp_path):
  out = str(tmp_path / "relation_kl.jsonl")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "relation_kl.py"), "--seqs", "16", "32",
                      "--batch-tokens", "64", "--heads", "2", "--width", "8", "--blocks", "16", "--reps", "3",
                      "--max-gb", "1e-9", "--out", out],
                     capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  lines = make_tables.load_jsonl(out)
  assert lines[-1]["command"].startswith("python benchmarks/relation_kl.py --seqs 16 32")
  table = make_tables.relation_kl(PAGE, path=out)
  rows = [line for line in table.splitlines() if line.startswith("| 16 (4)") or line.startswith("| 32 (2)")]
  assert len(rows) == 2
  # --max-gb below every path's memory: each is compiled and sized, none run.
  assert all(cell.strip().startswith("not run:") for row in rows for cell in row.strip("|").split("|")[1:])
  assert table.splitlines()[0] == ("| T (batch) | direct | chunked (1 head at a time) | blockwise (16 keys) |")


def _bench_line(row, round_, tokens, compile_only=False):
  shape, path, _ = long_steps.ROWS[row]
  line = {"row": row, "shape": shape, "relation_loss": path, "round": round_}
  if compile_only:
    return {**line, "compiled_memory_bytes": 32.9e9}
  return {**line, "tokens_per_s": tokens, "step_ms": 8 * 512 / tokens * 1e3, "mfu": tokens / 1e4,
          "peak_flops_per_s": 4e11 + round_, "peak_memory_bytes": 1.8e9}


def test_long_steps_table_gives_the_spread_over_rounds(tmp_path):
  path = str(tmp_path / "long_steps.jsonl")
  lines = [_bench_line(0, 0, 350.0), _bench_line(4, 0, 0, compile_only=True), _bench_line(0, 1, 370.0),
           {"row": "summary", "rounds": 2, **record.provenance("benchmarks/long_steps.py", ["--rounds", "2"])}]
  record.write_jsonl(path, lines)
  table = make_tables.long_steps(PAGE, path=path).splitlines()
  assert table[2] == "| 8 × 512, A_r 48 | blockwise, 128 keys (the default) | 350-370 | 11.1-11.7 s | 0.04 | 1.8 GB |"
  assert table[3].endswith("| direct (`--chunk-heads 12`), compiled only |  |  |  | 32.9 GB |")
  assert "2 rounds" in table[-1] and "400 GFLOP/s" in table[-1]
  only = make_tables.long_steps(PAGE, path=path, rows_shown=(0,)).splitlines()
  assert only[2] == table[2] and only[3] == "" and len(only) == 5


def test_long_steps_says_which_run_failed(monkeypatch):
  failed = subprocess.CompletedProcess([], 1, stdout="", stderr="warning\nValueError: bad shape\n")
  monkeypatch.setattr(record.subprocess, "run", lambda *a, **k: failed)
  with pytest.raises(RuntimeError, match="ValueError: bad shape"):
    long_steps.bench("teacher", ["--batch", "8"])


def test_data_scale_throughput_writes_what_its_table_is_made_from(tmp_path):
  source, out = tmp_path / "small.txt", str(tmp_path / "data_throughput.jsonl")
  source.write_text("".join(f"Document {i} says something about tokenising text.\n\n" for i in range(200)))
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "data_scale.py"), "throughput",
                      "--source", str(source), "--procs", "1", "--rounds", "1", "--out", out],
                     capture_output=True, text=True, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["data_throughput.jsonl", "small.txt"]  # nothing else written
  table = make_tables.data_throughput(os.path.join(ROOT, "docs", "data.md"), path=out).splitlines()
  assert table[0].startswith("| tokenising 0 MiB of text (")
  assert table[2].startswith("| 1 process | ") and table[2].endswith(" | 1.00× |")


def test_data_memory_table_gives_the_difference(tmp_path):
  path = str(tmp_path / "data_memory.jsonl")
  record.write_jsonl(path, [
      {"run": "demo corpus", "steps": 20, "peak_rss_mb": 2463.0, "secs": 138.0, "source_bytes": None},
      {"run": "big.txt", "steps": 20, "peak_rss_mb": 2800.0, "secs": 1176.0, "source_bytes": 1073742508},
      {"summary": True, **record.provenance("benchmarks/data_scale.py", ["memory"])}])
  table = make_tables.data_memory(os.path.join(ROOT, "docs", "data.md"), path=path).splitlines()
  assert table[2] == "| over the demo corpus | 2,463 MB | 2.3 min |"
  assert table[3] == "| over `big.txt` (1,073,742,508 bytes) | 2,800 MB: **+337 MB** | 19.6 min |"


def test_routes_writes_what_its_table_is_made_from(tmp_path):
  out = str(tmp_path / "routes.jsonl")
  # A stand-in benchmark: the same loss on every route, and a route's speed from its XLA_FLAGS.
  bench = ("import json, os; f = os.environ.get('XLA_FLAGS', ''); "
           "print(json.dumps({'tokens_per_s': 200.0 if 'ynn' in f else 100.0, 'loss': 2.5}))")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "routes.py"), "--routes", "plain",
                      "--rounds", "2", "--out", out, "--", "python", "-c", bench],
                     capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert r.returncode == 0, r.stderr[-2000:]
  table = make_tables.routes_step(PAGE, path=out).splitlines()
  assert table[2] == "| `default` | 100 (100-100) | 1.00× | ok (0.0e+00) |"
  assert table[3] == "| `plain` | 200 (200-200) | 2.00× | ok (0.0e+00) |"
  assert "2 rounds" in table[-1]


def test_compare_writes_what_its_table_is_made_from(tmp_path, monkeypatch):
  import compare
  out = str(tmp_path / "compare.jsonl")
  fake = {"minilm_jax.bench": {"tokens_per_s": 300.0, "peak_flops_per_s": 4e11, "model_flops_per_step": 1e11},
          "torch_peer.py": {"tokens_per_s": 200.0, "model_flops_per_step": 1e11}}
  monkeypatch.setattr(record, "run_json",
                      lambda cmd: next(v for k, v in fake.items() if any(k in c for c in cmd)))
  monkeypatch.setattr(sys, "argv", ["compare.py", "--teacher", "t", "--rounds", "2", "--no-compile",
                                    "--out", out])
  compare.main()
  table = make_tables.compare_peers(PAGE, path=out).splitlines()
  assert table[2].startswith("| minilm_jax | 300-300 |")
  assert table[3] == "| PyTorch eager peer | 200-200 | 0.01 | 1.50× |"
  assert "`python benchmarks/compare.py --teacher t --rounds 2 --no-compile --out " in table[-1]
