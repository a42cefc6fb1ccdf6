"""minilm-compile: a config's step compiled for an accelerator that is not here (aot.py).

The TPU tests need libtpu (the `tpu` extra, in the test extra); the H100 test the CUDA plugin (the
`cuda` extra, not in the test extra: 5 GB); each is skipped without it.
"""

import json
import os
import subprocess
import sys

import pytest

from minilm_jax import aot, hlo, targets
from conftest import override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not targets.has_module("libtpu"), reason="libtpu not installed")
needs_cuda = pytest.mark.skipif(not (targets.has_module("jax_plugins.xla_cuda12") or
                                     targets.has_module("jax_cuda12_plugin")),
                                reason="the CUDA plugin is not installed")


@pytest.fixture(scope="module")
def teacher_config(tmp_path_factory):
  """A small BERT's config.json alone: all minilm-compile reads of a teacher."""
  folder = tmp_path_factory.mktemp("teacher")
  cfg = dict(model_type="bert", vocab_size=1000, hidden_size=128, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=512, max_position_embeddings=128,
             type_vocab_size=2)
  (folder / "config.json").write_text(json.dumps(cfg))
  return str(folder)


def small_config(teacher, **overrides):
  from minilm_jax.config import default_config
  c = default_config()
  c.teacher = teacher
  c.student.update(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256, init="random")
  c.loss.update(version="v2", relation_heads=4, terms="relations")
  c.data.max_len = 128
  c.batch_size = 32
  c.steps = 1000
  c.precision = "bfloat16"
  return override(c, **overrides)


@pytest.fixture(scope="module")
def v5e4_bf16(teacher_config):
  """The small bf16 config compiled for a v5e-4 (data-parallel over 4 chips) and its report."""
  if not targets.has_module("libtpu"):
    pytest.skip("libtpu not installed")
  c = aot.compile_step(small_config(teacher_config), "v5e-4")
  return c, aot.report(c)


@needs_libtpu
def test_demo_config_compiles_for_a_small_tpu_slice():
  # What CI guards: the demo's real step (its packaged teacher's config, its terms) still compiles for
  # TPU, through the command users run. The last line is the JSON report.
  r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "minilm-compile"), "--config",
                      os.path.join(ROOT, "configs", "demo.py"), "--target", "v5e-4"],
                     capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  for key in ("target", "devices", "memory_per_device_bytes", "hbm_bytes", "fits", "step_seconds_estimate",
              "tokens_per_s_estimate", "mfu_estimate", "collectives", "budget_hours", "budget_chip_hours"):
    assert key in report, key
  assert (report["target"], report["devices"], report["fits"]) == ("v5e-4", 4, True)
  assert 0 < report["memory_per_device_bytes"] < 0.85 * report["hbm_bytes"]
  assert 0 < report["step_seconds_estimate"] < 1 and 0 < report["mfu_estimate"] < 1
  assert report["tokens_per_s_estimate"] == pytest.approx(32 * 128 / report["step_seconds_estimate"])
  assert report["budget_hours"] == pytest.approx(report["step_seconds_estimate"] * 120 / 3600)
  # The gradients, over 4 chips: with xla_flags.TPU_FLAGS, in pieces that overlap the backward pass.
  assert report["collectives"]["all-reduce"]["count"] >= 2
  assert report["collectives"]["all-reduce"]["async"] >= 1
  assert "memory per device" in r.stdout and "MFU" in r.stdout and "top traffic" in r.stdout
  names = [name for name, _ in report["top_traffic"]]
  assert any("student" in n for n in names) and all(b > 0 for _, b in report["top_traffic"])


@needs_libtpu
def test_report_figures_agree_with_the_compiled_program(v5e4_bf16):
  c, r = v5e4_bf16
  assert r["fits"] and r["memory_per_device_bytes"] == aot.memory_per_device(c.compiled)
  cost = c.compiled.cost_analysis()
  uncosted = hlo.custom_call_targets(c.hlo_text)["ConcatBitcast"]
  assert r["step_seconds_estimate"] == pytest.approx(cost["optimal_seconds"] + uncosted)
  assert r["mfu_estimate"] == pytest.approx(
      r["model_flops_per_step"] / (r["step_seconds_estimate"] * 4 * 197e12))


@needs_libtpu
def test_bf16_step_reduces_gradients_in_fp32_and_scatters_nothing_in_bf16(v5e4_bf16):
  # Mixed precision as users expect: bf16 compute, fp32 gradients across chips, no bf16 scatter-add
  # (the word embedding's gradient accumulates in fp32; positions and token types are reductions).
  c, _ = v5e4_bf16
  ins = list(hlo.instructions(c.hlo_text))
  reduced = [a for i in ins if hlo.collective_kind(i.op) in ("all-reduce", "reduce-scatter")
             for a in i.arrays]
  assert reduced and {dtype for dtype, _ in reduced} == {"f32"}
  assert not [i for i in ins if i.op == "scatter" and "bf16" in i.shape]
  assert any(i.op in ("convolution", "fusion") and "bf16" in i.shape for i in ins)  # compute is bf16
  # The Pallas kernels (attention, relation KL) are in the step.
  assert hlo.custom_call_targets(c.hlo_text)["tpu_custom_call"] >= 4


def test_vector_memory_overflow_is_not_told_to_shrink_the_batch(teacher_config):
  # XLA:TPU's words when a 2 MiB all-reduce piece overflowed a v4's VMEM (xla_flags.py), and when HBM ran
  # out: only the second is the batch's doing.
  cfg, t = small_config(teacher_config), targets.parse("v4-32")
  vmem = aot.refusal("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                     "space vmem. Used 16.41M of 16.00M vmem. Exceeded vmem capacity by 424.0K.", cfg, t)
  assert isinstance(vmem, aot.OutOfVmem) and "grad_accum" not in str(vmem) and "v4-32" in str(vmem)
  hbm = aot.refusal("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                    "temporaries (28.12G) exceeds available HBM (15.75G).", cfg, t)
  assert isinstance(hbm, aot.DoesNotFit) and "grad_accum" in str(hbm)


@needs_libtpu
def test_a_step_that_does_not_fit_is_refused_in_one_line(teacher_config, tmp_path):
  from minilm_jax import cli
  cfg_py = tmp_path / "big.py"
  cfg_py.write_text(f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_aot import small_config
def get_config():
  return small_config({teacher_config!r}, batch_size=65536)
""")
  with pytest.raises(aot.DoesNotFit, match="grad_accum"):
    aot.compile_step(small_config(teacher_config, batch_size=65536), "v5e-1")
  r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "minilm-compile"), "--config",
                      str(cfg_py), "--target", "v5e-1"], capture_output=True, text=True, timeout=600)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("minilm-compile: error: the step does not fit on v5e-1") and "grad_accum" in last


@needs_cuda
def test_h100_bf16_step_has_no_bf16_scatter(teacher_config):
  c = aot.compile_step(small_config(teacher_config), "h100")
  r = aot.report(c)
  assert r["fits"] and r["step_seconds_estimate"] is None and r["mfu_estimate"] is None
  assert not [i for i in hlo.instructions(c.hlo_text) if i.op == "scatter" and "bf16" in i.shape]


def test_step_seconds_adds_back_one_second_per_uncosted_custom_call():
  class Fake:
    def __init__(self, cost):
      self.cost = cost

    def cost_analysis(self):
      return self.cost
  text = 'custom_call_target="ConcatBitcast"\n' * 3 + 'custom_call_target="tpu_custom_call"'
  assert aot.step_seconds(Fake({"optimal_seconds": -2.75}), text) == pytest.approx(0.25)
  assert aot.step_seconds(Fake({}), text) is None  # XLA:GPU has no cost model
  assert aot.step_seconds(Fake({"optimal_seconds": -3.5}), text) is None  # an uncosted call unknown


def test_teacher_folder_reads_only_a_config(teacher_config, monkeypatch):
  assert aot.teacher_folder(teacher_config) == teacher_config
  shipped = aot.teacher_folder("bert-base-uncased")  # the recipes' teachers ship their config.json
  assert os.path.isfile(os.path.join(shipped, "config.json"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match="no-such/teacher"):
    aot.teacher_folder("no-such/teacher")


def test_unknown_target_and_pmap_are_one_line_errors(teacher_config):
  with pytest.raises(targets.UnknownTarget):
    aot.compile_step(small_config(teacher_config), "v9-8")
  with pytest.raises(ValueError, match="jit"):
    aot.compile_step(small_config(teacher_config, **{"parallel.mode": "pmap"}), "v5e-4")
