"""The Pallas kernels' block planning: lane padding, heads per grid step, blocks and the padded length."""

import pytest

from minilm_jax import kernel_blocks


def test_lane_width_pads_a_head_to_divide_128_or_to_whole_tiles():
  assert [kernel_blocks.lane_width(d) for d in (8, 12, 16, 48, 64, 96, 128, 200)] == [
      8, 16, 16, 64, 64, 128, 128, 256]


def test_heads_per_step_fill_whole_tiles_at_every_width():
  assert kernel_blocks.heads_per_step(48, 16, 8) == 16  # MiniLMv2: 256 teacher and 128 student lanes a step
  assert kernel_blocks.heads_per_step(12, 64, 32) == 4
  assert kernel_blocks.heads_per_step(12, 64) == 2      # attention: one width
  assert kernel_blocks.heads_per_step(4, 8, 8) == 4     # narrower than 128 lanes in all: one step, all heads
  assert kernel_blocks.heads_per_step(6, 256) == 1


def test_auto_block_pads_no_further_than_128_alignment_and_fits_vmem():
  assert [kernel_blocks.auto_block(t) for t in (7, 100, 128, 200, 384, 512, 640, 1000, 8192)] == [
      128, 128, 128, 256, 384, 512, 128, 512, 512]
  over = lambda limit: lambda b: kernel_blocks.VMEM_BUDGET + 1 if b > limit else 0
  assert kernel_blocks.auto_block(1024, over(256)) == 256
  assert kernel_blocks.auto_block(1024, over(0)) == 128  # 128 at the least, fitting or not


def test_blocks_given_or_automatic_and_the_padded_length():
  assert kernel_blocks.blocks(130, 256, 128, lambda: 0 / 0) == (256, 128, 256)
  assert kernel_blocks.blocks(700, 384, 256, lambda: 0 / 0) == (384, 256, 768)  # lcm 768
  assert kernel_blocks.blocks(700, None, 128, lambda: 512) == (512, 128, 1024)
  for bad in (0, 100, -128):
    with pytest.raises(ValueError, match="block_k must be a positive multiple of 128"):
      kernel_blocks.blocks(512, 128, bad, lambda: 128)


def test_fp32_matmuls_count_six_mxu_passes_in_both_kernels_costs():
  # The compiler's cost model takes a Pallas kernel's flops from its CostEstimate: fp32 (HIGHEST)
  # matmuls must count their bf16 passes there, or the step's estimate is too fast.
  import jax
  from minilm_jax import attention_plan, relation_plan
  assert kernel_blocks.mxu_passes(jax.lax.Precision.HIGHEST) == 6
  assert kernel_blocks.mxu_passes(jax.lax.Precision.DEFAULT) == 1
  plan = lambda dtype: attention_plan.make_plan(2, 4, 256, 64, dtype, 128, 128, 0, True)
  bf16, fp32 = plan("bfloat16"), plan("float32")
  for kind in ("forward", "backward"):
    assert attention_plan.cost(fp32, kind).flops > 5 * attention_plan.cost(bf16, kind).flops, kind
  p = relation_plan.make_plan(2, 48, 256, 16, 8, 128, 128, True)
  pairs = 2 * 48 * 256 * 256
  assert relation_plan.cost(p, "forward").flops >= pairs * 2 * (128 + 128) * 6  # 16-lane heads fill 128-deep
