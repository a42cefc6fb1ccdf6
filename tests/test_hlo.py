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
  %all-reduce.8 = f32[16]{0} all-reduce(f32[16]{0} %c), to_apply=%add
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
      "all-gather": {"count": 1, "largest_bytes": 8 * 128 * 2},
      "all-reduce": {"count": 2, "largest_bytes": 384 * 1536 * 4}}
  assert hlo.custom_call_targets(TEXT) == {"ConcatBitcast": 2}


def test_a_real_compiled_program_parses():
  text = jax.jit(lambda x, w: jnp.tanh(x @ w).sum()).lower(
      jnp.ones((8, 16)), jnp.ones((16, 4))).compile().as_text()
  ops = [i.op for i in hlo.instructions(text)]
  assert "parameter" in ops and len(ops) >= 3
  assert hlo.collectives(text) == {}
