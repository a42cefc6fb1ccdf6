"""Tests for minilm_jax.attention_kernel: the Pallas attention with dropout (interpret mode on CPU)
against a plain-jnp fp32 reference that applies the same keep_mask, values and the three gradients;
model.attention without dropout; the mask's statistics; and a compile for a TPU target (no TPU needed)
that must hold no [.., T, T] array."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import attention_kernel as ak
from minilm_jax import model

jax.config.update("jax_enable_x64", False)

RTOL = 1e-5  # fp32, as tests/test_losses.py and tests/test_relation_kernel.py
ATOL = 1e-6  # entries near 0
RATE = 0.1
KEEP = 1.0 - round(RATE * 65536) / 65536  # model.dropout's keep probability


# ------------------------------------------------------------------------------------------ inputs


def _mask(b, t):
  """[B, T] int32: right padding, left padding, a one-token row, then full rows."""
  mask = np.ones((b, t), np.int32)
  mask[0, t - 37:] = 0
  mask[1, :t // 2] = 0
  if b > 2:
    mask[2, 1:] = 0
  return mask


def _qkv(seed, b, t, d, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal((b, t, d)).astype(dtype) for _ in range(3))


def _seeds(b, seed=0):
  return jax.random.bits(jax.random.key(seed), (b,), jnp.uint32)


def _reference(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, keep_BHTS=None):
  """Softmax attention in fp32 (HIGHEST-precision matmuls), dropout by the given keep mask."""
  b, t, d = q_BTD.shape
  split = lambda x: x.astype(jnp.float32).reshape(b, t, num_heads, d // num_heads)
  s_BHTS = jnp.einsum("bthk,bshk->bhts", split(q_BTD), split(k_BTD), precision="highest")
  s_BHTS = jnp.where(mask_BT[:, None, None, :] > 0, s_BHTS / np.sqrt(d // num_heads), -1e30)
  p_BHTS = jax.nn.softmax(s_BHTS, axis=-1)
  if keep_BHTS is not None:
    p_BHTS = jnp.where(keep_BHTS, p_BHTS / KEEP, 0.0)
  return jnp.einsum("bhts,bshk->bthk", p_BHTS, split(v_BTD), precision="highest").reshape(b, t, d)


@functools.partial(jax.jit, static_argnums=(4,))
def _reference_vjp(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, keep_BHTS, g_BTD):
  """_reference's output and its (dq, dk, dv) for the cotangent g, as one program (eager op-by-op
  differentiation takes longer than the kernel in interpret mode)."""
  out, vjp = jax.vjp(lambda *x: _reference(*x, mask_BT, num_heads, keep_BHTS), q_BTD, k_BTD, v_BTD)
  return out, vjp(g_BTD)


# --------------------------------------------------------------------------- values and gradients

# (name, B, H, T, D, block_q, block_k, rate): T not a multiple of the blocks but in "exact"; several key
# and query blocks (online softmax, dq and dk accumulators); heads of 32 (4 a step) and 64 (2 a step),
# 128 (one a step: the half of a pair hash picked at run time), 48 (zero-padded to 64), and three heads
# of 32 in one 96-lane step (an odd step). Without dropout only for 32 and 64: the rest of that path is
# the dropout path's.
CASES = [
    ("d32", 3, 4, 200, 128, 128, 128, 0.0),
    ("d32", 3, 4, 200, 128, 128, 128, RATE),
    ("d64", 3, 2, 150, 128, None, None, 0.0),
    ("d64", 3, 2, 150, 128, None, None, RATE),
    ("d32_uneven_blocks", 2, 8, 130, 256, 256, 128, RATE),
    ("d64_exact_T", 2, 4, 128, 256, None, None, RATE),
    ("d128", 2, 2, 140, 256, 128, 128, RATE),
    ("d48", 2, 4, 100, 192, None, None, RATE),
    ("d32_three_heads_a_step", 2, 3, 100, 96, None, None, RATE),
]


@pytest.mark.parametrize("name,b,h,t,d,bq,bk,rate", CASES, ids=[f"{c[0]}-rate{c[-1]}" for c in CASES])
def test_values_and_gradients_match_reference(name, b, h, t, d, bq, bk, rate):
  q, k, v = _qkv(len(name), b, t, d)
  mask, seeds = _mask(b, t), _seeds(b)
  keep = ak.keep_mask(seeds, h, t, rate) if rate else None
  kernel = lambda *x: ak.attention(*x, mask, h, rate=rate, seeds_B=seeds, block_q=bq, block_k=bk,
                                   interpret=True)
  g = np.random.default_rng(1).standard_normal((b, t, d)).astype(np.float32)

  out, kernel_vjp = jax.vjp(kernel, q, k, v)   # the forward pass that saves residuals
  want, want_grads = _reference_vjp(q, k, v, mask, h, keep, g)
  assert out.shape == (b, t, d) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
  if name == "d32":  # the forward without residuals (a program of its own: once is enough)
    np.testing.assert_allclose(jax.jit(kernel)(q, k, v), out, rtol=RTOL, atol=ATOL)

  for got, ref, who in zip(kernel_vjp(g), want_grads, ("dq", "dk", "dv")):
    assert got.shape == ref.shape and got.dtype == jnp.float32, who
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=10 * ATOL, err_msg=who)


def test_without_dropout_equals_model_attention():
  b, h, t, d = 3, 4, 200, 128
  q, k, v = _qkv(3, b, t, d)
  mask = _mask(b, t)
  real = mask > 0
  got = ak.attention(q, k, v, mask, h, block_q=128, block_k=128, interpret=True)
  with jax.default_matmul_precision("highest"):
    want = model.attention(q, k, v, mask, h)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=RTOL, atol=ATOL)
  # rate 0 and seeds None are the same program: no dropout.
  same = ak.attention(q, k, v, mask, h, rate=0.0, seeds_B=_seeds(b), block_q=128, block_k=128,
                      interpret=True)
  np.testing.assert_array_equal(same, got)


def test_rows_are_independent_of_the_batch():
  # Under shard_map each device sees its own rows: row b's output (mask included) must depend only on
  # row b's inputs and seed, never on the batch size or position.
  b, h, t, d = 3, 4, 130, 128
  q, k, v = _qkv(5, b, t, d)
  mask, seeds = _mask(b, t), _seeds(b)
  run = lambda sl: ak.attention(q[sl], k[sl], v[sl], mask[sl], h, rate=RATE, seeds_B=seeds[sl],
                                interpret=True)
  np.testing.assert_allclose(run(slice(1, 3)), run(slice(0, 3))[1:], rtol=RTOL, atol=ATOL)


def test_bf16_inputs():
  b, h, t, d = 2, 4, 130, 128
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(9, b, t, d))
  mask, seeds = _mask(b, t), _seeds(b)
  f = lambda *x: ak.attention(*x, mask, h, rate=RATE, seeds_B=seeds, interpret=True)
  out, vjp = jax.vjp(f, q, k, v)
  assert out.dtype == jnp.bfloat16
  g = np.ones((b, t, d), jnp.bfloat16)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # the fp32 truth on the same bf16 numbers
  want, want_grads = _reference_vjp(f32(q), f32(k), f32(v), mask, h, ak.keep_mask(seeds, h, t, RATE),
                                    f32(g))
  # bf16 rounding of the output and of P, dS before their matmuls (model.attention's own bf16 error
  # here is 1.2e-2 without dropout, the kernel's 4e-3).
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=1e-2)
  for got, ref in zip(vjp(g), want_grads):
    assert got.dtype == jnp.bfloat16
    scale = np.abs(np.asarray(ref)).max()
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=1e-2 * scale)


def test_rows_without_real_keys_are_finite():
  b, h, t, d = 2, 2, 100, 128
  q, k, v = _qkv(4, b, t, d)
  mask = np.ones((b, t), np.int32)
  mask[0] = 0  # no real key anywhere in row 0
  f = lambda *x: ak.attention(*x, mask, h, rate=RATE, seeds_B=_seeds(b), interpret=True).sum()
  value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


# ------------------------------------------------------------------------------------------ mask


def test_mask_keeps_the_right_fraction_and_is_deterministic():
  b, h, t = 4, 12, 256
  seeds = _seeds(b, seed=3)
  keep = np.asarray(ak.keep_mask(seeds, h, t, RATE))
  assert keep.shape == (b, h, t, t) and keep.dtype == bool
  n = keep.size
  # Kept with probability KEEP each: the fraction lies within 6 standard deviations.
  assert abs(keep.mean() - KEEP) < 6 * np.sqrt(KEEP * (1 - KEEP) / n)
  # Every head and row of it too, within 6 of their (wider) deviations.
  per_head = keep.mean((2, 3))
  assert np.all(np.abs(per_head - KEEP) < 6 * np.sqrt(KEEP * (1 - KEEP) / (t * t)))
  # The two heads that share a 32-bit hash, and neighbouring keys, drop independently.
  both = (keep[:, 0::2] & keep[:, 1::2]).mean()
  assert abs(both - KEEP**2) < 6 * np.sqrt(KEEP**2 * (1 - KEEP**2) / (n / 2))
  neighbours = (keep[..., :-1] & keep[..., 1:]).mean()
  assert abs(neighbours - KEEP**2) < 6 * np.sqrt(KEEP**2 * (1 - KEEP**2) / (n / 2))
  np.testing.assert_array_equal(ak.keep_mask(seeds, h, t, RATE), keep)  # identical between calls
  assert np.asarray(ak.keep_mask(seeds, h, t, 0.0)).all()
  np.testing.assert_allclose(np.asarray(ak.keep_mask(seeds, h, t, 0.5)).mean(), 0.5, atol=2e-3)


def test_different_seeds_give_different_masks():
  h, t = 4, 64
  seeds = np.array([0, 1, 2**31, 2**32 - 1], np.uint32)
  keep = np.asarray(ak.keep_mask(seeds, h, t, RATE))
  masks = keep.reshape(len(seeds) * h, -1)  # every (row, head) a mask of its own
  differ = (masks[:, None, :] != masks[None, :, :]).mean(-1)
  off_diagonal = differ[~np.eye(len(masks), dtype=bool)]
  # Two independent masks differ in 2·keep·(1 − keep) of their entries (0.18).
  assert off_diagonal.min() > 0.15 and off_diagonal.max() < 0.21
  np.testing.assert_array_equal(ak.keep_mask(seeds[2:3], h, t, RATE), keep[2:3])  # per row, not batch


def test_kernel_applies_keep_mask_exactly():
  # With v = identity rows, the context is (P ∘ M / keep) itself: its zeros are the mask's.
  b, h, t = 2, 1, 128
  rng = np.random.default_rng(0)
  q, k = (rng.standard_normal((b, t, 128)).astype(np.float32) for _ in range(2))
  v = np.broadcast_to(np.eye(t, 128, dtype=np.float32), (b, t, 128))
  seeds = _seeds(b, seed=7)
  ctx = ak.attention(q, k, v, np.ones((b, t), np.int32), h, rate=RATE, seeds_B=seeds, interpret=True)
  np.testing.assert_array_equal(np.asarray(ctx) != 0, np.asarray(ak.keep_mask(seeds, h, t, RATE))[:, 0])


# ------------------------------------------------------------------------------------------- plan


def test_plan_blocks_and_widths():
  plan = lambda t, dtype="bfloat16", d=32: ak._make_plan(64, 12, t, d, dtype, None, None, 0, False)
  assert [(plan(t).bq, plan(t).tp) for t in (7, 128, 200, 512, 640, 2048, 8192)] == [
      (128, 128), (128, 128), (256, 256), (512, 512), (128, 640), (512, 2048), (256, 8192)]
  # fp32 temporaries are twice as large: 256-blocks at T = 512 in v4's 16 MiB.
  assert plan(512, "float32").bq == 256
  assert (plan(512).hc, plan(512).width, plan(512, d=64).hc, plan(512, d=128).hc) == (4, 128, 2, 1)
  assert (plan(512, d=48).dw, plan(512, d=48).hc) == (64, 2)
  uneven = ak._make_plan(2, 8, 130, 32, "float32", 256, 128, 6554, True)
  assert (uneven.tp, uneven.nq, uneven.nk) == (256, 1, 2)


def test_bad_arguments_raise():
  q, k, v = _qkv(0, 1, 16, 64)
  mask = np.ones((1, 16), np.int32)
  with pytest.raises(ValueError, match="block_q"):
    ak.attention(q, k, v, mask, 2, block_q=100, interpret=True)
  with pytest.raises(ValueError, match="mask"):
    ak.attention(q, k, v, mask[:, :8], 2, interpret=True)
  with pytest.raises(ValueError, match="num_heads"):
    ak.attention(q, k, v, mask, 5, interpret=True)
  with pytest.raises(ValueError, match="rate"):
    ak.attention(q, k, v, mask, 2, rate=1.0, seeds_B=_seeds(1), interpret=True)
  with pytest.raises(ValueError, match="seeds_B"):
    ak.attention(q, k, v, mask, 2, rate=RATE, seeds_B=_seeds(2), interpret=True)
  with pytest.raises(ValueError, match="one shape"):
    ak.attention(q, k[:, :8], v, mask, 2, interpret=True)


# --------------------------------------------------------------------------------- TPU compilation


def test_compiles_for_tpu_without_a_t_by_t_array(monkeypatch):
  """XLA:TPU and Mosaic compile the forward and the gradient for a v5e (compile-only topology)."""
  pytest.importorskip("libtpu")
  # Compile-only: no TPU is opened, so a second process compiling at the same time may load libtpu too.
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from minilm_jax import targets

  devices = targets.devices(targets.parse("v5e-4"))
  sharding = NamedSharding(Mesh(np.array(devices[:1]), ("d",)), P())
  b, h, t, d = 2, 6, 384, 192  # heads of 32, 4 a step; T = 384 gives 3 x 3 blocks of 128
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  args = [spec((b, t, d), jnp.bfloat16)] * 3 + [spec((b, t), jnp.int32), spec((b,), jnp.uint32)]

  def loss(q, k, v, mask, seeds):
    ctx = ak.attention(q, k, v, mask, h, rate=RATE, seeds_B=seeds, block_q=128, block_k=128)
    return ctx.astype(jnp.float32).sum()

  t_by_t = re.compile(rf"\[(?:\d+,)*{t},{t}\]")
  for f in (loss, jax.grad(loss, argnums=(0, 1, 2))):
    compiled = jax.jit(f).lower(*args).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo
    assert not t_by_t.findall(hlo), t_by_t.findall(hlo)[:3]
    # The kernels' CostEstimates reached XLA's cost model (which counts each ConcatBitcast as -1 s).
    concat = hlo.count('custom_call_target="ConcatBitcast"')
    assert compiled.cost_analysis()["optimal_seconds"] + concat > 0
