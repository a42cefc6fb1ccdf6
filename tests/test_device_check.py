"""benchmarks/device_check.py: its --quick run on the CPU, its plan, budget and table."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.py")


def load_script():
  spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


dc = load_script()


@pytest.mark.slow  # ~55 s: the whole command on CPU; pytest -m slow
def test_quick_run_on_cpu(tmp_path, real_teacher):
  """Every kind of row, both precisions, positive times, no error, in one JSON file."""
  out = tmp_path / "x.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a plain machine
  proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], capture_output=True,
                        text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["platform"] == "cpu" and doc["device_count"] == 1 and doc["jax_version"]
  assert doc["date"] and "--quick" in doc["command"]
  rows = doc["rows"]
  assert [r for r in rows if r.get("error")] == []
  steps = [r for r in rows if r["kind"] == "step"]
  assert {(r["precision"], r["attention"]) for r in steps} == {
      (p, a) for p in ("float32", "bfloat16") for a in ("reference", "xla")}
  assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_memory_bytes"] > 0
             for r in steps)
  embeds = [r for r in rows if r["kind"] == "embedding"]
  assert {(r["case"], r["variant"], r["precision"]) for r in embeds} >= {
      (c, v, p) for c in ("word", "token_type") for v in ("gather", "library")
      for p in ("float32", "bfloat16")}
  assert all(r["ms"] > 0 for r in embeds)
  # In fp32 every variant computes the same gradient, up to the order of the sums.
  assert all(r["grad_rel_err"] < 1e-5 for r in embeds if r["precision"] == "float32")
  trainer, = [r for r in rows if r["kind"] == "trainer"]
  assert trainer["timed_steps"] == 2 and trainer["ms"] > 0 and trainer["final_loss"] > 0
  assert "trainer loop 3" in proc.stdout and "embed token_type" in proc.stdout  # the table


def test_plan_runs_the_big_shape_first_and_the_trainer_last():
  items = dc.plan("gpu", {"bfloat16": "cudnn", "float32": "reference"}, quick=False)
  first = [(it["precision"], it["batch"], it["seq"], it["attention"]) for it in items[:2]]
  assert first == [("bfloat16", 256, 128, "cudnn"), ("float32", 256, 128, "reference")]
  assert items[2]["kind"] == "embedding" and items[-1]["kind"] == "trainer"
  steps = [it for it in items if it["kind"] == "step"]
  assert len(steps) == 8  # 2 precisions × 2 shapes × 2 attentions
  # cuDNN's attention needs bf16: expected to fail in fp32, so tried after everything else.
  assert [it["expected_error"] for it in steps] == [False] * 6 + [True] * 2


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_budget_skips_what_would_not_fit():
  clock = FakeClock()
  timeouts = []

  def execute(item, timeout_s):
    timeouts.append(timeout_s)
    clock.now += 30
    return [{**dc.item_fields(item), "status": "ok", "ms": 1.0}]

  items = [{"kind": "step", "precision": "float32", "batch": 1, "seq": 8, "attention": "reference",
            "estimate_s": 10, "timeout_s": 100} for _ in range(3)]
  items.append({"kind": "trainer", "steps": 3, "estimate_s": 5, "timeout_s": 100})
  rows = dc.run_plan(items, 70, execute, clock=clock)
  # 70 s left, then 40: both fit the estimate; then 10 left < the 30 a step took; the trainer fits.
  assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "ok"]
  assert rows[2]["error"] == dc.SKIPPED
  assert timeouts == [70, 40, 10]  # never past the budget


def test_table_aligns_columns():
  rows = [{"kind": "step", "precision": "bfloat16", "batch": 256, "seq": 128, "attention": "cudnn",
           "ms": 12.345, "tokens_per_s": 2654000.0, "mfu": 0.3, "peak_memory_bytes": 3 * 2 ** 30},
          {"kind": "step", "precision": "float32", "batch": 256, "seq": 128, "attention": "cudnn",
           "expected_error": True, "error": "exit 1: ValueError: cuDNN needs bf16"},
          {"kind": "embedding", "case": "word", "variant": "gather", "precision": "bfloat16", "batch": 256,
           "seq": 128, "ms": 0.5, "tokens_per_s": 65536000.0}]
  lines = dc.format_table(rows).splitlines()
  assert len(lines) == 5 and lines[0].startswith("what")
  assert "12.35" in lines[2] and "30.0%" in lines[2] and "3.00 GiB" in lines[2]
  assert "(expected) exit 1" in lines[3] and "embed word" in lines[4]
  end_of_ms = lines[0].index("ms") + 2  # numbers align right under their heading
  assert lines[2][end_of_ms - 5:end_of_ms] == "12.35" and lines[4][end_of_ms - 4:end_of_ms] == "0.50"


def test_metrics_timing_leaves_out_the_first_interval():
  records = [{"step": 10, "loss": 5.0, "tokens_per_s": 10.0},   # holds the compilation
             {"step": 20, "loss": 4.0, "tokens_per_s": 1000.0},
             {"step": 30, "loss": 3.0, "tokens_per_s": 500.0}]
  t = dc.metrics_timing(records, tokens_per_step=100)
  # 10 steps in 1 s, then 10 in 2 s: 150 ms a step
  assert t["timed_steps"] == 20 and abs(t["ms"] - 150) < 1e-9 and t["final_loss"] == 3.0
