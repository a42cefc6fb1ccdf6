"""relation_plan: the relation kernels' blocks, their token-major layout, and what the kernels cost."""

import jax.numpy as jnp
import numpy as np

from minilm_jax import relation_plan


def test_plan_blocks_heads_and_widths():
  plan = relation_plan.make_plan(2, 4, 130, 12, 8, 256, 128, True)
  assert (plan.tp, plan.nq, plan.nk, plan.dt, plan.ds) == (256, 1, 2, 16, 8)
  assert not relation_plan.one_block(plan)
  assert relation_plan.one_block(relation_plan.make_plan(2, 4, 130, 12, 8, None, None, True))
  # VMEM decides too: 1024 + 128 lanes a step do not fit 512-blocks in v4's 16 MiB.
  assert relation_plan.make_plan(1, 48, 1024, 16, 8, None, None, False).bq == 512
  assert relation_plan.make_plan(1, 48, 1024, 64, 8, None, None, False).bq == 256


def test_token_major_pads_heads_and_rows_with_zeros():
  plan = relation_plan.make_plan(2, 3, 5, 12, 8, 128, 128, True)
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 12)).astype(np.float32)
  y = np.asarray(relation_plan.token_major(jnp.asarray(x), plan, plan.dt))
  assert y.shape == (2, plan.tp, 3 * plan.dt) and plan.dt == 16
  for h in range(3):  # head h's lanes [16h, 16h + 12) hold it, the rest of its 16 are zero
    np.testing.assert_array_equal(y[:, :5, 16 * h:16 * h + 12], np.swapaxes(x, 1, 2)[:, :, h])
    assert not y[:, :5, 16 * h + 12:16 * (h + 1)].any()
  assert not y[:, 5:].any()


def test_padding_keys_are_invisible():
  plan = relation_plan.make_plan(1, 1, 3, 8, 8, 128, 128, True)
  info = np.asarray(relation_plan.key_info(jnp.asarray([[1, 1, 0]]), jnp.asarray([[0, 1, 1]]), plan))
  assert info.shape == (1, 2, plan.tp)
  np.testing.assert_array_equal(info[0, :, :4], [[1, 1, 0, 0], [0, 1, 1, 0]])
  assert not info[0, 0, 3:].any()
