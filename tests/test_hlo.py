"""Reading optimised HLO text (hlo.py)."""

import jax
import jax.numpy as jnp

from minilm_jax import hlo

TEXT = """
ENTRY %main (p0: bf16[8,128]) -> f32[8,128] {
  %param.1 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather-start.3 = (bf16[2,128]{1,0}, bf16[8,128]{1,0}) all-gather-start(bf16[2,128]{1,0} %x), dimensions={0}
  %all-gather-done.3 = bf16[8,128]{1,0} all-gather-done((bf16[2,128]{1,0}, bf16[8,128]{1,0}) %all-gather-start.3)
  %all-reduce.7 = (f32[384,1536]{1,0}, f32[384]{0}) all-reduce(f32[384,1536]{1,0} %g, f32[384]{0} %b), to_apply=%add
  %all-reduce.8 = f32[16]{0} all-reduce(f32[16]{0} %c), to_apply=%add, frontend_attributes={async_collective_name="all-reduce-start.1"}
  %custom-call.5 = f32[384,1536]{1,0:T(8,128)S(3)} custom-call(%a, %b), custom_call_target="ConcatBitcast"
  %custom-call.6 = f32[4]{0} custom-call(%c), custom_call_target="ConcatBitcast"
  ROOT %fusion.2 = f32[8,128]{1,0} fusion(bf16[8,128]{1,0} %all-gather-done.3), kind=kLoop, calls=%f
}
"""


def test_instructions_shapes_and_operands():
  ins = {i.name: i for i in hlo.instructions(TEXT)}
  assert ins["param.1"].arrays == [("bf16", (8, 128))]
  assert ins["all-reduce.7"].arrays == [("f32", (384, 1536)), ("f32", (384,))]
  assert ins["all-reduce.7"].largest_bytes == 384 * 1536 * 4
  assert ins["fusion.2"].op == "fusion" and ins["fusion.2"].operand_arrays == [("bf16", (8, 128))]


def test_collectives_count_async_pairs_once():
  assert hlo.collective_kind("all-gather-start") == "all-gather"
  assert hlo.collective_kind("all-gather-done") == "" and hlo.collective_kind("fusion") == ""
  assert hlo.collectives(TEXT) == {
      "all-gather": {"count": 1, "largest_bytes": 8 * 128 * 2, "async": 1},
      "all-reduce": {"count": 2, "largest_bytes": 384 * 1536 * 4, "async": 1}}  # XLA:TPU's async fusion
  assert hlo.custom_call_targets(TEXT) == {"ConcatBitcast": 2}


def test_a_real_compiled_program_parses():
  text = jax.jit(lambda x, w: jnp.tanh(x @ w).sum()).lower(
      jnp.ones((8, 16)), jnp.ones((16, 4))).compile().as_text()
  ops = [i.op for i in hlo.instructions(text)]
  assert "parameter" in ops and len(ops) >= 3
  assert hlo.collectives(text) == {}


def test_top_traffic_sums_operands_and_results_by_source():
  text = """
ENTRY %main {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  %fusion.1 = bf16[64,256]{1,0} fusion(%p0, %p1), kind=kOutput, metadata={op_name="jit(step)/jvp(teacher)/BertEncoder/encoder/layer/3/output/dense/dot_general"}
  %fusion.2 = bf16[64,256]{1,0} fusion(%p0, %p1), kind=kOutput, metadata={op_name="jit(step)/jvp(teacher)/BertEncoder/encoder/layer/11/output/dense/dot_general"}
  %copy-start.1 = (bf16[64,128]{1,0}, bf16[64,128]{1,0:S(1)}, u32[]) copy-start(%p0)
  %copy-done.1 = bf16[64,128]{1,0:S(1)} copy-done(%copy-start.1)
  %slice-start.1 = ((bf16[128,256]{1,0}), bf16[32,256]{1,0:S(1)}, s32[]) slice-start(%p1), slice={[0:32], [0:256]}
  %custom-call.1 = bf16[128,256]{1,0:S(1)} custom-call(%slice-start.1), custom_call_target="ConcatBitcast"
  ROOT %add.1 = bf16[64,256]{1,0} add(%fusion.1, %fusion.2)
}
"""
  top = dict(hlo.top_traffic(text))
  per_matmul = 2 * (64 * 128 + 128 * 256 + 64 * 256)
  assert top["jvp(teacher)/BertEncoder/encoder/layer/N/output/dense/dot_general"] == 2 * per_matmul
  assert top["(copy-start: memory-space copies)"] == 2 * 64 * 128 * 2
  assert top["(slice-start: memory-space copies)"] == 2 * 32 * 256 * 2
  assert top["(add)"] == 3 * 64 * 256 * 2
  assert len(top) == 4 and hlo.top_traffic(text, 1)[0][0].startswith("jvp(teacher)")
