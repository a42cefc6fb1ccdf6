"""Tests for minilm_jax.relation_kernel: the Pallas relation KL (interpret mode on CPU) against a float64
oracle, losses.blockwise_kl_rows and the direct losses._heads_kl, values and all four gradients; and a
compile for a TPU target (no TPU needed) that must hold no [.., T, T] array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import losses
from minilm_jax import relation_kernel as rk
from minilm_jax import relation_plan

jax.config.update("jax_enable_x64", False)

RTOL = 1e-5  # fp32, as tests/test_losses.py
ATOL = 1e-6  # entries near 0 (a KL of nearly equal rows, the gradient of a barely visible key)


# ------------------------------------------------------------------------------------------ inputs


def _masks(kind, b, t):
  """mask [B, T] bool and segment ids [B, T] int32 of one test case."""
  mask, seg = np.ones((b, t), bool), np.zeros((b, t), np.int32)
  if kind in ("padding", "segments"):
    mask[0, t - 37:] = False  # right padding
    mask[1, :t // 2] = False  # left padding
    if b > 2:
      mask[2, 1:] = False     # a single real token
  if kind == "segments":
    seg[0, 60:] = 1
    seg[0, 61:] = 2             # a one-token document
    seg[1, t // 2 + 9:] = 5
    seg[2:, :] = 7
  if kind == "empty":
    mask[0, :] = False        # no key is visible from any query of row 0
    seg[1, 5:] = 1
    mask[1, :5] = False       # queries 0..4 of row 1 see no key (segment 0 has no real token)
  return mask, seg


def _inputs(seed, b, c, t, d, e):
  rng = np.random.default_rng(seed)
  # Scaled as kl_rows expects: the a side by 1/sqrt(width), so logits are about unit normal.
  side = lambda w, scale: (scale * rng.standard_normal((b, c, t, w))).astype(np.float32)
  return side(d, d**-0.5), side(d, 1.0), side(e, e**-0.5), side(e, 1.0)


def _log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _oracle(ta, tb, sa, sb, mask, seg):
  """KL_t [B, C, T] in float64, one query row at a time over its visible keys only (0 if none)."""
  b, c, t, _ = ta.shape
  out = np.zeros((b, c, t))
  f64 = lambda x: np.asarray(x, np.float64)
  zt, zs = f64(ta) @ np.swapaxes(f64(tb), -1, -2), f64(sa) @ np.swapaxes(f64(sb), -1, -2)
  for i in range(b):
    for q in range(t):
      keys = mask[i] & (seg[i] == seg[i, q])
      if keys.any():
        lt, ls = _log_softmax(zt[i, :, q][:, keys]), _log_softmax(zs[i, :, q][:, keys])  # [C, n]
        out[i, :, q] = (np.exp(lt) * (lt - ls)).sum(-1)
  return out


# --------------------------------------------------------------------------- values and gradients

# (name, B, C, T, d, e, masks, block_q, block_k): T not a multiple of the blocks everywhere but "exact";
# d ≠ e; d = 12 does not divide 128 (zero-padded to 16); several key blocks (online log-sum-exp) and
# unequal query and key blocks.
CASES = [
    ("padding", 3, 4, 200, 16, 8, "padding", 128, 128),
    ("segments", 3, 2, 150, 8, 16, "segments", 128, 128),
    ("empty_rows", 2, 3, 100, 16, 16, "empty", None, None),
    ("exact_T_wide_heads", 2, 2, 128, 32, 64, "padding", None, None),
    ("uneven_blocks", 2, 4, 130, 12, 8, "segments", 256, 128),
]


@pytest.mark.parametrize("name,b,c,t,d,e,kind,bq,bk", CASES, ids=[c[0] for c in CASES])
def test_values_and_gradients_match_blockwise_and_oracle(name, b, c, t, d, e, kind, bq, bk):
  ta, tb, sa, sb = _inputs(len(name), b, c, t, d, e)
  mask, seg = _masks(kind, b, t)
  kernel = lambda *x: rk.kl_rows(*x, mask, seg, block_q=bq, block_k=bk, interpret=True)
  blockwise = lambda *x: losses.blockwise_kl_rows(*x, mask, seg, 64)

  kl, kernel_vjp = jax.vjp(kernel, ta, tb, sa, sb)        # the forward pass that saves residuals
  want, blockwise_vjp = jax.vjp(blockwise, ta, tb, sa, sb)
  assert kl.shape == (b, c, t) and kl.dtype == jnp.float32
  assert np.all(np.isfinite(kl))
  np.testing.assert_allclose(kl, _oracle(ta, tb, sa, sb, mask, seg), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(kl, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(jax.jit(kernel)(ta, tb, sa, sb), kl, rtol=RTOL, atol=ATOL)  # no residuals

  g_BCT = np.random.default_rng(1).standard_normal((b, c, t)).astype(np.float32)
  for got, ref, who in zip(kernel_vjp(g_BCT), blockwise_vjp(g_BCT), ("ta", "tb", "sa", "sb")):
    assert got.shape == ref.shape, who
    assert np.all(np.isfinite(got)), who
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL, err_msg=who)


def test_rows_without_visible_keys_are_zero_and_finite():
  b, c, t = 2, 3, 100
  ta, tb, sa, sb = _inputs(7, b, c, t, 16, 8)
  mask, seg = _masks("empty", b, t)
  kl, vjp = jax.vjp(lambda *x: rk.kl_rows(*x, mask, seg, interpret=True), ta, tb, sa, sb)
  np.testing.assert_array_equal(kl[0], 0.0)
  np.testing.assert_array_equal(kl[1, :, :5], 0.0)
  # A zero weight on those rows keeps the loss and its gradient clean (0 × NaN would not).
  w_BCT = np.ones((b, c, t), np.float32)
  w_BCT[0], w_BCT[1, :, :5] = 0.0, 0.0
  for g in vjp(w_BCT):
    assert np.all(np.isfinite(g))
  assert np.all(np.asarray(vjp(w_BCT)[0])[0] == 0.0)


def test_weighted_loss_matches_direct_path():
  # The direct path (losses._heads_kl, [B, T, C, d] inputs, every [B, C, T, T] tensor at once) as
  # losses._relation_kl_sum uses it: the same weighted sum and gradients.
  b, c, t, d, e = 3, 4, 140, 16, 8
  ta, tb, sa, sb = _inputs(11, b, c, t, d, e)
  mask, seg = _masks("segments", b, t)
  w_BT = losses._token_weights(jnp.asarray(mask), jnp.asarray(seg), c, "example", jnp.float32)
  tokens_major = lambda x: jnp.swapaxes(x, 1, 2)

  def direct(*x):
    return losses._heads_kl(*map(tokens_major, x), losses._key_valid(jnp.asarray(mask), jnp.asarray(seg)),
                            w_BT)

  def kernel(*x):
    return jnp.einsum("bct,bt->", rk.kl_rows(*x, mask, seg, block_q=128, block_k=128, interpret=True), w_BT)

  want, g_want = jax.value_and_grad(direct, argnums=(0, 1, 2, 3))(ta, tb, sa, sb)
  got, g_got = jax.value_and_grad(kernel, argnums=(0, 1, 2, 3))(ta, tb, sa, sb)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  for gk, gd in zip(g_got, g_want):
    np.testing.assert_allclose(gk, gd, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("dtype,block,teacher_grads", [
    (jnp.float32, None, True), (jnp.bfloat16, None, False),  # one block: value and gradients at once
    (jnp.float32, 128, False), (jnp.bfloat16, 128, True),    # several: the forward, then the backward
])
def test_weighted_sums_match_the_rows(dtype, block, teacher_grads):
  # kl_rows with weights: Σ_{c,t} w·KL per example, the value and all five gradients (weights too) those
  # of the rows' path weighted afterwards, for any cotangent per example.
  b, c, t, d, e = 2, 4, 200, 16, 8
  ta, tb, sa, sb = (jnp.asarray(x, dtype) for x in _inputs(4, b, c, t, d, e))
  mask, seg = _masks("segments", b, t)
  w = jnp.asarray(np.random.default_rng(3).random((b, t)), jnp.float32)
  kw = dict(scale=(0.3, 0.4), teacher_grads=teacher_grads, block_q=block, block_k=block, interpret=True)
  plan = relation_plan.make_plan(b, c, t, d, e, block, block, True, dtype, teacher_grads=teacher_grads)
  assert relation_plan.one_block(plan) == (block is None)
  rows = lambda *x: jnp.einsum("bct,bt->b", rk.kl_rows(*x[:4], mask, seg, **kw), x[4])
  weighted = lambda *x: rk.kl_rows(*x[:4], mask, seg, x[4], **kw)
  want, want_vjp = jax.vjp(rows, ta, tb, sa, sb, w)
  got, got_vjp = jax.vjp(weighted, ta, tb, sa, sb, w)
  assert got.shape == (b,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(jax.jit(weighted)(ta, tb, sa, sb, w), want, rtol=RTOL, atol=ATOL)
  g_B = jnp.asarray([0.7, -1.3])
  f32 = lambda x: np.asarray(x, np.float32)
  for x, ref, who in zip(got_vjp(g_B), want_vjp(g_B), ("ta", "tb", "sa", "sb", "w")):
    assert x.dtype == ref.dtype, who
    # bf16: the same fp32 gradient up to its order of sums, then one bf16 rounding each
    np.testing.assert_allclose(f32(x), f32(ref), rtol=RTOL if dtype == jnp.float32 else 2**-7,
                               atol=ATOL, err_msg=who)
  with pytest.raises(ValueError, match="weights"):
    rk.kl_rows(ta, tb, sa, sb, mask, seg, w[:, :10], **kw)


@pytest.mark.parametrize("teacher_grads", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_block_backward_matches_the_two_kernels(dtype, teacher_grads):
  # T ≤ the block: one kernel gives the four gradients from logits computed once; the numbers are the
  # two kernels' (which the tests above hold to the oracle), for fp32 and for bf16's split dz.
  b, c, t, d, e = 2, 4, 200, 16, 8
  ta, tb, sa, sb = (jnp.asarray(x, dtype) for x in _inputs(9, b, c, t, d, e))
  mask, seg = _masks("segments", b, t)
  plan = relation_plan.make_plan(b, c, t, d, e, 256, 256, True, dtype, (0.25, 0.5), teacher_grads)
  assert relation_plan.one_block(plan)
  tm = lambda x, w: relation_plan.token_major(x, plan, w)
  args = (relation_plan.key_info(jnp.asarray(mask), jnp.asarray(seg), plan),
          jnp.pad(jnp.asarray(seg, jnp.int32), ((0, 0), (0, plan.tp - t)))[:, None, :],
          tm(ta, plan.dt), tm(tb, plan.dt), tm(sa, plan.ds), tm(sb, plan.ds))
  _, lse_t, lse_s, c_rows = rk._forward_call(plan, *args, residuals=True)
  g = jnp.asarray(np.random.default_rng(2).standard_normal(lse_t.shape), jnp.float32)
  one = rk._one_block_call(plan, "both", *args, g, lse_t, lse_s, c_rows)
  d_ta, d_sa = rk._backward_call(plan, "dq", *args, g, lse_t, lse_s, c_rows)
  d_tb, d_sb = rk._backward_call(plan, "dk", *args, g, lse_t, lse_s, c_rows)
  for got, want, who in zip(one, (d_ta, d_tb, d_sa, d_sb), ("ta", "tb", "sa", "sb")):
    if not teacher_grads and who.startswith("t"):
      assert got is None and want is None
      continue
    assert got.dtype == jnp.float32 and np.any(np.asarray(want)), who
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=who)
  both = relation_plan.cost(plan, "both")
  assert both.flops < 0.9 * (relation_plan.cost(plan, "dq").flops + relation_plan.cost(plan, "dk").flops)  # logits once, not twice
  # and with the forward's statistics in the same kernel, its logits are not computed again
  assert relation_plan.cost(plan, "value_and_grad").flops < 0.9 * (relation_plan.cost(plan, "forward").flops + both.flops)
  assert not relation_plan.one_block(relation_plan.make_plan(b, c, t, d, e, 128, 128, True, dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_without_teacher_gradients_the_student_ones_are_unchanged(dtype):
  # The trainer's teacher is frozen: teacher_grads=False computes the student's gradients only (the
  # same numbers), the teacher's are zeros, and the backward's cost drops by the teacher's matmuls.
  b, c, t, d, e = 2, 4, 150, 16, 8
  ta, tb, sa, sb = (jnp.asarray(x, dtype) for x in _inputs(3, b, c, t, d, e))
  mask, seg = _masks("segments", b, t)
  f = lambda grads: lambda *x: rk.kl_rows(*x, mask, seg, teacher_grads=grads, interpret=True).sum()
  v_all, g_all = jax.value_and_grad(f(True), argnums=(0, 1, 2, 3))(ta, tb, sa, sb)
  v_st, g_st = jax.value_and_grad(f(False), argnums=(0, 1, 2, 3))(ta, tb, sa, sb)
  np.testing.assert_array_equal(v_st, v_all)
  for got, ref in zip(g_st[2:], g_all[2:]):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
  for g in g_st[:2]:
    assert g.dtype == dtype and not np.any(np.asarray(g, np.float32))
  assert np.any(np.asarray(g_all[0], np.float32))
  both, student = (relation_plan.make_plan(b, c, t, d, e, None, None, True, dtype, teacher_grads=x) for x in (1, 0))
  for kind in ("dq", "dk"):
    assert relation_plan.cost(student, kind).flops < 0.8 * relation_plan.cost(both, kind).flops, kind
  assert relation_plan.cost(student, "forward").flops == relation_plan.cost(both, "forward").flops


def test_bf16_inputs_with_the_scale_on_the_logits_are_fp32_exact():
  # bf16 inputs (a bf16 run's Q, K, V) stay bf16: each product is exact, the logits take the 1/√d scale
  # in fp32, and the gradients' fp32 dz is split in three bf16 parts. So the KL and the gradients (before
  # their final bf16 rounding) are the fp32 ones of the same bf16 numbers, unscaled inputs and all.
  b, c, t, d, e = 3, 4, 200, 16, 8
  rng = np.random.default_rng(5)
  bf = lambda w: jnp.asarray(rng.standard_normal((b, c, t, w)), jnp.bfloat16)
  ta, tb, sa, sb = bf(d), bf(d), bf(e), bf(e)
  mask, seg = _masks("segments", b, t)
  scale = (d**-0.5, e**-0.5)
  f32 = lambda x: np.asarray(x, np.float32)
  kl, vjp = jax.vjp(lambda *x: rk.kl_rows(*x, mask, seg, scale=scale, block_q=128, block_k=128,
                                            interpret=True), ta, tb, sa, sb)
  assert kl.dtype == jnp.float32
  oracle = _oracle(f32(ta) * scale[0], f32(tb), f32(sa) * scale[1], f32(sb), mask, seg)
  np.testing.assert_allclose(kl, oracle, rtol=RTOL, atol=ATOL)

  g_BCT = np.random.default_rng(1).standard_normal((b, c, t)).astype(np.float32)
  blockwise = lambda x0, x1, x2, x3: losses.blockwise_kl_rows(x0 * scale[0], x1, x2 * scale[1], x3, mask,
                                                                 seg, 64)
  _, ref_vjp = jax.vjp(blockwise, *map(f32, (ta, tb, sa, sb)))
  want = ref_vjp(g_BCT)
  got = vjp(g_BCT)
  for x, w in zip(got, want):
    assert x.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(x), w, rtol=2**-8, atol=ATOL)  # the final rounding to bf16 only
  # Before that rounding: the kernels' fp32 gradients at the fp32 tolerance.
  plan = relation_plan.make_plan(b, c, t, d, e, 128, 128, True, jnp.bfloat16, scale)
  tm = lambda x, w: relation_plan.token_major(x, plan, w)
  args = (relation_plan.key_info(jnp.asarray(mask), jnp.asarray(seg), plan),
          jnp.pad(jnp.asarray(seg, jnp.int32), ((0, 0), (0, plan.tp - t)))[:, None, :],
          tm(ta, plan.dt), tm(tb, plan.dt), tm(sa, plan.ds), tm(sb, plan.ds))
  _, lse_t, lse_s, c_rows = rk._forward_call(plan, *args, residuals=True)
  g = jnp.pad(jnp.asarray(g_BCT), ((0, 0), (0, 0), (0, plan.tp - t))).reshape(lse_t.shape)
  d_ta, d_sa = rk._backward_call(plan, "dq", *args, g, lse_t, lse_s, c_rows)
  d_tb, d_sb = rk._backward_call(plan, "dk", *args, g, lse_t, lse_s, c_rows)
  heads_major = lambda x, w, width: jnp.swapaxes(x.reshape(b, plan.tp, c, width), 1, 2)[:, :, :t, :w]
  for x, w, width, ref in ((d_ta, d, plan.dt, want[0]), (d_tb, d, plan.dt, want[1]),
                           (d_sa, e, plan.ds, want[2]), (d_sb, e, plan.ds, want[3])):
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(heads_major(x, w, width), ref, rtol=RTOL, atol=ATOL)


def test_bad_blocks_and_shapes_raise():
  ta, tb, sa, sb = _inputs(0, 1, 2, 16, 8, 8)
  mask, seg = np.ones((1, 16), bool), np.zeros((1, 16), np.int32)
  with pytest.raises(ValueError, match="block_q"):
    rk.kl_rows(ta, tb, sa, sb, mask, seg, block_q=100, interpret=True)
  with pytest.raises(ValueError, match="mask"):
    rk.kl_rows(ta, tb, sa, sb, mask[:, :8], seg, interpret=True)
  with pytest.raises(ValueError, match="kl_rows needs"):
    rk.kl_rows(ta, tb[:, :1], sa, sb, mask, seg, interpret=True)


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
  b, c, t, d, e = 2, 48, 256, 16, 8  # MiniLMv2 relation heads of a 768-wide teacher, 384-wide student
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  # The model's [B, T, C·d] layout, split into heads as losses._blockwise_heads_kl does.
  args = [spec((b, t, c * d))] * 2 + [spec((b, t, c * e))] * 2 + [spec((b, t), jnp.bool_),
                                                                  spec((b, t), jnp.int32)]
  heads_major = lambda x: jnp.swapaxes(x.reshape(b, t, c, -1), 1, 2)

  def loss(ta, tb, sa, sb, mask, seg):
    return rk.kl_rows(*map(heads_major, (ta, tb, sa, sb)), mask, seg).sum()

  t_by_t = re.compile(rf"\[(?:\d+,)*{t},{t}\]")
  for f in (loss, jax.grad(loss, argnums=(0, 1, 2, 3))):
    compiled = jax.jit(f).lower(*args).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo
    assert not t_by_t.findall(hlo), t_by_t.findall(hlo)[:3]
    # The kernels' CostEstimates reached XLA's cost model (it counts an XLA-internal ConcatBitcast as
    # -1 s, which heads-major parameters can bring in; this layout has none).
    assert compiled.cost_analysis()["optimal_seconds"] > 0
