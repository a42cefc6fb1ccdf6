"""Tests for minilm_jax.attention_kernel: the Pallas attention with dropout (interpret mode on CPU)
against a plain-jnp fp32 reference that applies the same keep_mask, values and the three gradients;
model.attention without dropout; a local window against the reference and modernbert.attention, and
the block pairs out of its reach never touched; the mask's statistics; and a compile for a TPU target
(no TPU needed) that must hold no [.., T, T] array, and costs less with a window."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import attention_kernel as ak, attention_plan, dropout_hash
from minilm_jax import model, modernbert

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


def _allowed(mask_BT, window):
  """bool [B, 1, T, S]: real keys, within ±window of the query (inclusive) where window is set."""
  allowed = jnp.asarray(mask_BT)[:, None, None, :] > 0
  if window is not None:
    pos = np.arange(mask_BT.shape[1])
    allowed = allowed & (np.abs(pos[:, None] - pos[None, :]) <= window)
  return allowed


def _reference(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, keep_BHTS=None, window=None):
  """Softmax attention in fp32 (HIGHEST-precision matmuls) over _allowed keys, dropout by the given
  keep mask."""
  b, t, d = q_BTD.shape
  split = lambda x: x.astype(jnp.float32).reshape(b, t, num_heads, d // num_heads)
  s_BHTS = jnp.einsum("bthk,bshk->bhts", split(q_BTD), split(k_BTD), precision="highest")
  s_BHTS = jnp.where(_allowed(mask_BT, window), s_BHTS / np.sqrt(d // num_heads), -1e30)
  p_BHTS = jax.nn.softmax(s_BHTS, axis=-1)
  if keep_BHTS is not None:
    p_BHTS = jnp.where(keep_BHTS, p_BHTS / KEEP, 0.0)
  return jnp.einsum("bhts,bshk->bthk", p_BHTS, split(v_BTD), precision="highest").reshape(b, t, d)


@functools.partial(jax.jit, static_argnums=(4, 7))
def _reference_vjp(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, keep_BHTS, g_BTD, window=None):
  """_reference's output and its (dq, dk, dv) for the cotangent g, as one program (eager op-by-op
  differentiation takes longer than the kernel in interpret mode)."""
  out, vjp = jax.vjp(lambda *x: _reference(*x, mask_BT, num_heads, keep_BHTS, window), q_BTD, k_BTD,
                     v_BTD)
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
  keep = dropout_hash.keep_mask(seeds, h, t, rate) if rate else None
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
  want, want_grads = _reference_vjp(f32(q), f32(k), f32(v), mask, h, dropout_hash.keep_mask(seeds, h, t, RATE),
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


# ---------------------------------------------------------------------------------------- window

# (name, B, H, T, D, block_q, block_k, window, rate): _mask's padding leaves queries without a real key
# in reach (their outputs and gradients must still be finite); T = 200 and 24 not multiples of the
# block; windows 0 (a band of one block), 1, 8 (and 64: test_window_equals_modernbert_attention); bands
# that start past key block 0 (dropout counters off the step) with uneven blocks both ways; T = 520 (5
# blocks: bands of 3 with skipped edge steps); a window ≥ T − 1 is full attention (the same plan: see
# test_window_plan_bands_and_blocks).
_slow = pytest.mark.slow  # each case is ~2 s of tracing: the default run keeps one of each kind
WINDOW_CASES = [
    ("d32_w0", 2, 4, 200, 128, 128, 128, 0, 0.0),
    ("d32_w1", 2, 4, 200, 128, 128, 128, 1, RATE),
    ("d64_T24_w8", 2, 2, 24, 128, None, None, 8, RATE),
    ("d32_w8_bq256", 2, 4, 300, 128, 256, 128, 8, RATE),
    pytest.param("d32_w8_5_blocks", 2, 4, 520, 128, 128, 128, 8, RATE, marks=_slow),
    pytest.param("d64_w64_bk256", 2, 2, 300, 128, 128, 256, 64, RATE, marks=_slow),
    pytest.param("d64_w_ge_T", 2, 2, 200, 128, 128, 128, 250, RATE, marks=_slow),
]


def _reached(mask, window):
  """bool [B, T]: queries with a real key within reach (the others' values are the kernel's own)."""
  return np.asarray(_allowed(mask, window))[:, 0].any(-1)


@pytest.mark.parametrize("name,b,h,t,d,bq,bk,window,rate", WINDOW_CASES,
                         ids=[getattr(c, "values", c)[0] for c in WINDOW_CASES])
def test_window_values_and_gradients_match_reference(name, b, h, t, d, bq, bk, window, rate):
  q, k, v = _qkv(len(name), b, t, d)
  mask, seeds = _mask(b, t), _seeds(b)
  keep = dropout_hash.keep_mask(seeds, h, t, rate) if rate else None
  kernel = lambda *x: ak.attention(*x, mask, h, window=window, rate=rate, seeds_B=seeds, block_q=bq,
                                   block_k=bk, interpret=True)
  reached = _reached(mask, window)
  # No cotangent on the queries without a key in reach: their gradients are the kernel's own too.
  g = np.random.default_rng(1).standard_normal((b, t, d)).astype(np.float32) * reached[..., None]

  out, kernel_vjp = jax.vjp(kernel, q, k, v)
  want, want_grads = _reference_vjp(q, k, v, mask, h, keep, g, window)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(np.asarray(out)[reached], np.asarray(want)[reached], rtol=RTOL, atol=ATOL)
  for got, ref, who in zip(kernel_vjp(g), want_grads, ("dq", "dk", "dv")):
    assert np.all(np.isfinite(got)), who
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=10 * ATOL, err_msg=who)


def test_window_equals_modernbert_attention():
  # The model's local layers (|t − s| ≤ window, inclusive), values and gradients, without dropout: T =
  # 520 in 5 blocks of 128, bands of 3 key blocks, heads of 64; queries from 365 on reach no real key.
  b, h, t, d, window = 1, 2, 520, 128, 64
  q, k, v = _qkv(11, b, t, d)
  mask = np.ones((b, t), np.int32)
  mask[0, 300:] = 0
  reached = _reached(mask, window)
  g = np.random.default_rng(2).standard_normal((b, t, d)).astype(np.float32) * reached[..., None]
  got, got_vjp = jax.vjp(lambda *x: ak.attention(*x, mask, h, window=window, block_q=128, block_k=128,
                                                 interpret=True), q, k, v)
  with jax.default_matmul_precision("highest"):
    want, want_vjp = jax.vjp(lambda *x: modernbert.attention(*x, mask, h, window), q, k, v)
    want_grads = want_vjp(g)
  np.testing.assert_allclose(np.asarray(got)[reached], np.asarray(want)[reached], rtol=RTOL, atol=ATOL)
  for got_g, want_g, who in zip(got_vjp(g), want_grads, ("dq", "dk", "dv")):
    np.testing.assert_allclose(got_g, want_g, rtol=RTOL, atol=10 * ATOL, err_msg=who)


# (poisoned positions, inputs, query rows, key rows checked): T = 640, blocks of 128, w = 8. Positions
# [512, 640) lie outside the bands of query blocks 0-2 (and of key blocks 0-1). Key block 2 lies in
# query block 0's band (key blocks 0-2) but past its reach (keys ≤ 135), and query block 2 in key block
# 0's band (query blocks 0-2) past its reach (queries ≤ 135): edge steps, which must not read them.
POISON_CASES = [
    pytest.param((512, 640), "qkv", 384, 256, id="beyond_the_bands"),
    pytest.param((256, 384), "kv", 128, 0, id="forward_band_edge", marks=_slow),
    pytest.param((256, 384), "q", 256, 128, id="backward_band_edge"),
]


@pytest.mark.parametrize("poisoned,inputs,q_rows,k_rows", POISON_CASES)
def test_window_never_reads_blocks_out_of_reach(poisoned, inputs, q_rows, k_rows):
  """NaN in the inputs at positions out of reach of the checked rows: a block pair worked on and merely
  masked still spreads it (0 · NaN in P·V and dS; a NaN lse), so finite rows show that no step brings
  those blocks into its work: the bands leave them out, the edge steps skip the work (pl.when) and
  their index maps repeat a block in reach. Block-wise: query rows in a block pair with a poisoned row
  are poisoned whole, and so are the key rows a poisoned query block reaches."""
  b, h, t, d, window = 1, 2, 640, 128, 8
  q, k, v = _qkv(6, b, t, d)
  mask = np.ones((b, t), np.int32)
  g = np.random.default_rng(3).standard_normal((b, t, d)).astype(np.float32)
  lo, hi = poisoned
  fill = lambda x, name, value: x if name not in inputs else np.concatenate(
      [x[:, :lo], np.full_like(x[:, lo:hi], value), x[:, hi:]], axis=1)
  f = lambda *x: ak.attention(*x, mask, h, window=window, block_q=128, block_k=128, interpret=True)
  out, vjp = jax.vjp(f, *(fill(x, n, np.nan) for x, n in zip((q, k, v), "qkv")))
  dq, dk, dv = vjp(g)
  # The reference on zeros there: the checked rows do not depend on those positions.
  want, (want_dq, want_dk, want_dv) = _reference_vjp(*(fill(x, n, 0) for x, n in zip((q, k, v), "qkv")),
                                                     mask, h, None, g, window)
  np.testing.assert_allclose(out[:, :q_rows], want[:, :q_rows], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(dq[:, :q_rows], want_dq[:, :q_rows], rtol=RTOL, atol=10 * ATOL)
  np.testing.assert_allclose(dk[:, :k_rows], want_dk[:, :k_rows], rtol=RTOL, atol=10 * ATOL)
  np.testing.assert_allclose(dv[:, :k_rows], want_dv[:, :k_rows], rtol=RTOL, atol=10 * ATOL)
  assert not np.isfinite(out).all()  # the poison is there


# ------------------------------------------------------------------------------------------ mask


def test_kernel_applies_keep_mask_exactly():
  # With v = identity rows, the context is (P ∘ M / keep) itself: its zeros are the mask's.
  b, h, t = 2, 1, 128
  rng = np.random.default_rng(0)
  q, k = (rng.standard_normal((b, t, 128)).astype(np.float32) for _ in range(2))
  v = np.broadcast_to(np.eye(t, 128, dtype=np.float32), (b, t, 128))
  seeds = _seeds(b, seed=7)
  ctx = ak.attention(q, k, v, np.ones((b, t), np.int32), h, rate=RATE, seeds_B=seeds, interpret=True)
  np.testing.assert_array_equal(np.asarray(ctx) != 0, np.asarray(dropout_hash.keep_mask(seeds, h, t, RATE))[:, 0])


# ------------------------------------------------------------------------------------------- plan


def test_plan_blocks_and_widths():
  plan = lambda t, dtype="bfloat16", d=32: attention_plan.make_plan(64, 12, t, d, dtype, None, None, 0, False)
  assert [(plan(t).bq, plan(t).tp) for t in (7, 128, 200, 512, 640, 2048, 8192)] == [
      (128, 128), (128, 128), (256, 256), (512, 512), (128, 640), (512, 2048), (256, 8192)]
  # fp32 temporaries are twice as large: 256-blocks at T = 512 in v4's 16 MiB.
  assert plan(512, "float32").bq == 256
  assert (plan(512).hc, plan(512).width, plan(512, d=64).hc, plan(512, d=128).hc) == (4, 128, 2, 1)
  assert (plan(512, d=48).dw, plan(512, d=48).hc) == (64, 2)
  uneven = attention_plan.make_plan(2, 8, 130, 32, "float32", 256, 128, 6554, True)
  assert (uneven.tp, uneven.nq, uneven.nk) == (256, 1, 2)


def test_window_plan_bands_and_blocks():
  plan = lambda t, window, bq=None, bk=None: attention_plan.make_plan(8, 12, t, 64, "bfloat16", bq, bk, 0, False,
                                                           window)
  # Automatic blocks: 128 at T = 512, w = 64 (10 of 16 block pairs, bands of 3); the full 512 where
  # 128-blocks would skip little (w = 256: 14 of 16 pairs in 16 steps instead of one).
  p = plan(512, 64)
  assert (p.bq, p.bk, p.kband, p.qband, p.visits) == (128, 128, 3, 3, 10)
  assert (plan(512, 256).bq, plan(512, 256).visits) == (512, 1)
  assert plan(8192, 64).bq == 128 and plan(8192, 512).bq == 256
  # A window over all of T is no window; without one, the plan is the full attention's.
  assert plan(200, 199).window is None and plan(200, 198).window == 198
  assert plan(512, None) == attention_plan.make_plan(8, 12, 512, 64, "bfloat16", None, None, 0, False)
  assert (plan(512, None).kband, plan(512, None).visits) == (1, 1)
  # Uneven blocks: query blocks of 256 reach 3 key blocks of 128, key blocks 2 query blocks.
  p = plan(300, 8, 256, 128)
  assert (p.nq, p.nk, p.kband, p.qband, p.visits) == (2, 4, 3, 2, 6)
  with pytest.raises(ValueError, match="window"):
    plan(512, -1)


@pytest.mark.parametrize("t,window,bq,bk", [(640, 8, 128, 128), (520, 64, 128, 256), (1000, 100, 256, 128),
                                            (512, 0, 128, 128)])
def test_window_cost_counts_the_block_pairs_in_reach(t, window, bq, bk):
  """The CostEstimates' pairs are those of the block pairs holding a pair within ±window, counted
  here by brute force over positions; the copies of k, v (forward) and q, dO (backward) shrink with
  them."""
  p = attention_plan.make_plan(2, 4, t, 64, "float32", bq, bk, 0, True, window)
  full = p._replace(window=None)
  pos = np.arange(p.tp)
  near = np.abs(pos[:, None] - pos[None, :]) <= window
  pairs = near.reshape(p.nq, bq, p.nk, bk).any((1, 3)).sum() * bq * bk * 2 * 4
  for kind in ("forward", "backward"):
    cost, cost_full = attention_plan.cost(p, kind), attention_plan.cost(full, kind)
    per_row = 0 if kind == "backward" else 2 * 4 * (p.tp + p.visits * bq)  # exp(m_old − m_new), log
    assert cost.transcendentals - per_row == pairs, kind
    assert cost.flops < cost_full.flops and cost.bytes_accessed < cost_full.bytes_accessed, kind


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
  with pytest.raises(ValueError, match="window"):
    ak.attention(q, k, v, mask, 2, window=-1, interpret=True)


# --------------------------------------------------------------------------------- TPU compilation


def test_compiles_for_tpu_without_a_t_by_t_array(monkeypatch):
  """XLA:TPU and Mosaic compile the forward and the gradient for a v5e (compile-only topology), with and
  without a window (which the cost model finds cheaper)."""
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

  def loss(q, k, v, mask, seeds, window=None):
    ctx = ak.attention(q, k, v, mask, h, window=window, rate=RATE, seeds_B=seeds, block_q=128,
                       block_k=128)
    return ctx.astype(jnp.float32).sum()

  t_by_t = re.compile(rf"\[(?:\d+,)*{t},{t}\]")
  for f in (loss, jax.grad(loss, argnums=(0, 1, 2))):
    seconds = {}
    for window in (None, 64):  # 64: bands of 2 or 3 of the 3 key blocks (7 of 9 block pairs)
      compiled = jax.jit(functools.partial(f, window=window)).lower(*args).compile()
      hlo = compiled.as_text()
      assert "tpu_custom_call" in hlo
      assert not t_by_t.findall(hlo), t_by_t.findall(hlo)[:3]
      # The kernels' CostEstimates reached XLA's cost model (which counts each ConcatBitcast as -1 s).
      concat = hlo.count('custom_call_target="ConcatBitcast"')
      seconds[window] = compiled.cost_analysis()["optimal_seconds"] + concat
      assert seconds[window] > 0
    assert seconds[64] < seconds[None]
