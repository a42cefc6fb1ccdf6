"""Tests for minilm_jax.losses: a plain-numpy oracle, invariances, gradients, errors, chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from minilm_jax import losses
from minilm_jax.losses import minilm_v1_loss, minilm_v2_loss, relation_kl

jax.config.update("jax_enable_x64", False)

RTOL = 1e-5  # fp32 tolerance against the float64 oracle; never relaxed (bf16 test excepted)

# Mixed padding, B=5, T=7: right-padded, left-padded, none, fully padded, length 1.
MASK = np.array(
    [
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.int32,
)
D_T, D_S = 48, 24


def rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def rand_qkv(rng, b, t, d):
  return tuple(rand(rng, b, t, d) for _ in range(3))


# ------------------------------------------------------------------------------------------ oracle


def _softmax_rows(z):
  out = np.empty_like(z)
  for i in range(z.shape[0]):
    e = np.exp(z[i] - z[i].max())
    out[i] = e / e.sum()
  return out


def _relation(a, b, h, num_heads):
  """Relation of head h for one example's real tokens a, b: [n, D] -> [n, n], float64."""
  d = a.shape[1] // num_heads
  x = a[:, h * d : (h + 1) * d].astype(np.float64)
  y = b[:, h * d : (h + 1) * d].astype(np.float64)
  return _softmax_rows(x @ y.T / np.sqrt(d))


def _documents(mask, segment_ids):
  """[(row, token indices)] for each example: a row's real tokens, or one (row, segment id)."""
  docs = []
  for b in range(mask.shape[0]):
    real = [t for t in range(mask.shape[1]) if mask[b, t]]
    if segment_ids is None:
      if real:
        docs.append((b, real))
      continue
    for seg in sorted({int(segment_ids[b, t]) for t in real}):
      docs.append((b, [t for t in real if segment_ids[b, t] == seg]))
  return docs


def oracle_relation_kl(ta, tb, sa, sb, mask, num_heads, reduction="example", segment_ids=None):
  """The spec's formulas, one example (document) at a time, without padding, in float64."""
  sums, lengths = [], []
  for b, idx in _documents(np.asarray(mask), segment_ids):
    total = 0.0
    for h in range(num_heads):
      r_t = _relation(ta[b, idx], tb[b, idx], h, num_heads)
      r_s = _relation(sa[b, idx], sb[b, idx], h, num_heads)
      for t in range(len(idx)):
        for s in range(len(idx)):
          if r_t[t, s] > 0:
            total += r_t[t, s] * (np.log(r_t[t, s]) - np.log(r_s[t, s]))
    sums.append(total)
    lengths.append(len(idx))
  if not sums:
    return 0.0
  if reduction == "example":
    return float(np.mean([s / (num_heads * n) for s, n in zip(sums, lengths)]))
  return float(sum(sums) / (num_heads * sum(lengths)))


def oracle_v1(tqkv, sqkv, mask, num_heads, weights=(1.0, 1.0), **kw):
  (tq, tk, tv), (sq, sk, sv) = tqkv, sqkv
  at = oracle_relation_kl(tq, tk, sq, sk, mask, num_heads, **kw)
  vr = oracle_relation_kl(tv, tv, sv, sv, mask, num_heads, **kw)
  return weights[0] * at + weights[1] * vr


def oracle_v2(tqkv, sqkv, mask, num_heads, weights=(1.0, 1.0, 1.0), **kw):
  return sum(
      w * oracle_relation_kl(t, t, s, s, mask, num_heads, **kw) for w, t, s in zip(weights, tqkv, sqkv)
  )


def test_oracle_is_positive_and_zero_on_itself():
  # Guard the oracle itself: KL ≥ 0, and 0 for identical relations.
  rng = np.random.default_rng(0)
  a, b = rand(rng, 2, 5, 8), rand(rng, 2, 5, 8)
  mask = np.ones((2, 5))
  assert oracle_relation_kl(a, b, a, b, mask, 2) == 0.0
  assert oracle_relation_kl(a, b, b, a, mask, 2) > 0.0


# -------------------------------------------------------------------------------- against oracle


@pytest.mark.parametrize("num_heads", [4, 6])
@pytest.mark.parametrize("reduction", ["example", "token"])
def test_relation_kl_matches_oracle(num_heads, reduction):
  rng = np.random.default_rng(1)
  ta, tb = rand(rng, 5, 7, D_T), rand(rng, 5, 7, D_T)
  sa, sb = rand(rng, 5, 7, D_S), rand(rng, 5, 7, D_S)
  got = relation_kl(ta, tb, sa, sb, MASK, num_heads, reduction)
  want = oracle_relation_kl(ta, tb, sa, sb, MASK, num_heads, reduction)
  assert got.dtype == jnp.float32 and got.shape == ()
  assert want > 0.01
  np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("reduction", ["example", "token"])
def test_v1_v2_match_oracle(reduction):
  rng = np.random.default_rng(2)
  tqkv, sqkv = rand_qkv(rng, 5, 7, D_T), rand_qkv(rng, 5, 7, D_S)
  mask = MASK.astype(bool)  # bool masks are accepted as well as int ones
  got = minilm_v1_loss(tqkv, sqkv, mask, 4, weights=(1.0, 0.5), reduction=reduction)
  np.testing.assert_allclose(got, oracle_v1(tqkv, sqkv, MASK, 4, (1.0, 0.5), reduction=reduction), rtol=RTOL)
  got = minilm_v2_loss(tqkv, sqkv, mask, 6, weights=(1.0, 2.0, 0.5), reduction=reduction)
  np.testing.assert_allclose(
      got, oracle_v2(tqkv, sqkv, MASK, 6, (1.0, 2.0, 0.5), reduction=reduction), rtol=RTOL
  )


def test_v1_weight_zero_drops_the_term():
  rng = np.random.default_rng(3)
  tqkv, sqkv = rand_qkv(rng, 5, 7, D_T), rand_qkv(rng, 5, 7, D_S)
  got = minilm_v1_loss(tqkv, sqkv, MASK, 4, weights=(0.0, 1.0))
  np.testing.assert_allclose(got, oracle_relation_kl(tqkv[2], tqkv[2], sqkv[2], sqkv[2], MASK, 4), rtol=RTOL)


# Packed rows, T=11: three docs + padding; one doc right-padded; two docs after left padding.
# Padding tokens carry arbitrary segment ids (they must be ignored).
PACKED_MASK = np.array(
    [[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]],
    dtype=np.int32,
)
PACKED_SEGMENTS = np.array(
    [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0], [5, 5, 5, 5, 5, 5, 5, 0, 1, 2, 3], [1, 0, 1, 1, 1, 7, 7, 7, 7, 7, 7]],
    dtype=np.int32,
)


@pytest.mark.parametrize("reduction", ["example", "token"])
def test_packed_matches_oracle_and_documents_alone(reduction):
  rng = np.random.default_rng(4)
  tqkv, sqkv = rand_qkv(rng, 3, 11, D_T), rand_qkv(rng, 3, 11, D_S)
  got = minilm_v2_loss(tqkv, sqkv, PACKED_MASK, 6, reduction=reduction, segment_ids=PACKED_SEGMENTS)
  want = oracle_v2(tqkv, sqkv, PACKED_MASK, 6, reduction=reduction, segment_ids=PACKED_SEGMENTS)
  np.testing.assert_allclose(got, want, rtol=RTOL)

  # The same documents unpacked: one per row, right-padded, no segment ids.
  docs = _documents(PACKED_MASK, PACKED_SEGMENTS)
  assert len(docs) == 6
  t_max = max(len(idx) for _, idx in docs)
  mask = np.zeros((len(docs), t_max), np.int32)
  unpacked = [np.zeros((len(docs), t_max, x.shape[-1]), np.float32) for x in tqkv + sqkv]
  for i, (b, idx) in enumerate(docs):
    mask[i, : len(idx)] = 1
    for dst, src in zip(unpacked, tqkv + sqkv):
      dst[i, : len(idx)] = src[b, idx]
  alone = minilm_v2_loss(tuple(unpacked[:3]), tuple(unpacked[3:]), mask, 6, reduction=reduction)
  np.testing.assert_allclose(got, alone, rtol=RTOL)
  # v1 and relation_kl take segment ids too.
  got_v1 = minilm_v1_loss(tqkv, sqkv, PACKED_MASK, 4, reduction=reduction, segment_ids=PACKED_SEGMENTS)
  want_v1 = oracle_v1(tqkv, sqkv, PACKED_MASK, 4, reduction=reduction, segment_ids=PACKED_SEGMENTS)
  np.testing.assert_allclose(got_v1, want_v1, rtol=RTOL)


# ------------------------------------------------------------------------------------- properties


def test_zero_when_student_equals_teacher():
  rng = np.random.default_rng(5)
  qkv = rand_qkv(rng, 5, 7, D_T)
  assert abs(float(relation_kl(qkv[0], qkv[1], qkv[0], qkv[1], MASK, 4))) < 1e-6
  assert abs(float(minilm_v1_loss(qkv, qkv, MASK, 4))) < 1e-6
  assert abs(float(minilm_v2_loss(qkv, qkv, MASK, 6, reduction="token"))) < 1e-6
  packed = tuple(x[:3] for x in qkv)
  assert (
      abs(float(minilm_v2_loss(packed, packed, PACKED_MASK[:, :7], 6, segment_ids=PACKED_SEGMENTS[:, :7])))
      < 1e-6
  )


def test_left_padding_equals_right_padding_equals_per_example_loop():
  rng = np.random.default_rng(6)
  lengths, t_max, heads = [3, 6, 1, 4], 6, 4
  examples = [(rand_qkv(rng, 1, n, D_T), rand_qkv(rng, 1, n, D_S)) for n in lengths]
  per_example = [float(minilm_v1_loss(t, s, np.ones((1, n)), heads)) for (t, s), n in zip(examples, lengths)]

  def batch(left):
    mask = np.zeros((len(lengths), t_max), np.int32)
    arrays = [np.zeros((len(lengths), t_max, d), np.float32) for d in [D_T] * 3 + [D_S] * 3]
    for i, ((t, s), n) in enumerate(zip(examples, lengths)):
      sl = slice(t_max - n, t_max) if left else slice(0, n)
      mask[i, sl] = 1
      for dst, src in zip(arrays, t + s):
        dst[i, sl] = src[0]
    return tuple(arrays[:3]), tuple(arrays[3:]), mask

  right = minilm_v1_loss(*batch(left=False), heads)
  left = minilm_v1_loss(*batch(left=True), heads)
  np.testing.assert_allclose(right, np.mean(per_example), rtol=RTOL)
  np.testing.assert_allclose(left, right, rtol=RTOL)


def test_batch_permutation_invariance():
  rng = np.random.default_rng(7)
  tqkv, sqkv = rand_qkv(rng, 5, 7, D_T), rand_qkv(rng, 5, 7, D_S)
  perm = np.array([3, 0, 4, 2, 1])
  for reduction in ("example", "token"):
    base = minilm_v2_loss(tqkv, sqkv, MASK, 6, reduction=reduction)
    permuted = minilm_v2_loss(
        tuple(x[perm] for x in tqkv), tuple(x[perm] for x in sqkv), MASK[perm], 6, reduction=reduction
    )
    np.testing.assert_allclose(permuted, base, rtol=RTOL)


def test_v2_with_qk_vv_pairs_equals_v1():
  rng = np.random.default_rng(8)
  (tq, tk, tv), (sq, sk, sv) = rand_qkv(rng, 5, 7, D_T), rand_qkv(rng, 5, 7, D_S)
  pairs = relation_kl(tq, tk, sq, sk, MASK, 4) + relation_kl(tv, tv, sv, sv, MASK, 4)
  np.testing.assert_allclose(pairs, minilm_v1_loss((tq, tk, tv), (sq, sk, sv), MASK, 4), rtol=RTOL)


def test_no_examples_gives_finite_zero():
  rng = np.random.default_rng(9)
  tqkv, sqkv = rand_qkv(rng, 2, 4, D_T), rand_qkv(rng, 2, 4, D_S)
  mask = np.zeros((2, 4), np.int32)
  for reduction in ("example", "token"):
    value, grads = jax.value_and_grad(lambda s: minilm_v2_loss(tqkv, s, mask, 6, reduction=reduction))(sqkv)
    assert float(value) == 0.0
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_finite_value_and_gradient_with_length_one_and_fully_padded_rows():
  rng = np.random.default_rng(10)
  tqkv, sqkv = rand_qkv(rng, 5, 7, D_T), rand_qkv(rng, 5, 7, D_S)
  for chunk_heads in (None, 2):
    value, (g_t, g_s) = jax.value_and_grad(
        lambda t, s: minilm_v1_loss(t, s, MASK, 4, chunk_heads=chunk_heads), argnums=(0, 1)
    )(tqkv, sqkv)
    assert np.isfinite(float(value)) and float(value) >= 0.0
    for g in jax.tree.leaves((g_t, g_s)):
      assert np.all(np.isfinite(np.asarray(g)))
    # Padded positions cannot influence the loss.
    for g in jax.tree.leaves(g_s):
      assert np.all(np.asarray(g)[MASK == 0] == 0.0)
    # The length-1 row (a single key: relation ≡ 1) carries no signal either.
    assert all(np.all(np.asarray(g)[4] == 0.0) for g in jax.tree.leaves(g_s))


def test_bf16_inputs_close_to_fp32_and_loss_is_fp32():
  rng = np.random.default_rng(11)
  tqkv, sqkv = rand_qkv(rng, 5, 7, D_T), rand_qkv(rng, 5, 7, D_S)
  ref = minilm_v2_loss(tqkv, sqkv, MASK, 6)
  bf = lambda xs: tuple(jnp.asarray(x, jnp.bfloat16) for x in xs)
  got = minilm_v2_loss(bf(tqkv), bf(sqkv), MASK, 6)
  assert got.dtype == jnp.float32
  # Loose ONLY here: rounding the inputs to bf16 (8-bit mantissa, relative error ~4e-3) perturbs the
  # logits themselves; the loss is computed in fp32 from those rounded inputs, so ~1% is expected.
  np.testing.assert_allclose(got, ref, rtol=2e-2)
  # Tight: the loss casts bf16 inputs up before any arithmetic, so it equals the fp32 loss of the
  # bf16-rounded inputs (fails if the relation matmuls or softmax ran in bf16).
  up = lambda xs: tuple(x.astype(jnp.float32) for x in xs)
  np.testing.assert_allclose(got, minilm_v2_loss(up(bf(tqkv)), up(bf(sqkv)), MASK, 6), rtol=RTOL)
  grads = jax.grad(lambda s: minilm_v2_loss(bf(tqkv), s, MASK, 6))(bf(sqkv))
  assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_path_equals_the_xla_path(dtype):
  # implementation="pallas_interpret": relation_kernel.kl_rows (interpreted) behind the same loss. fp32:
  # the XLA path's value and gradients. bf16: the fp32 loss and gradients of the same bf16 numbers (the
  # kernel keeps bf16 inputs, exact products; only the returned gradients are rounded to bf16).
  rng = np.random.default_rng(21)
  tqkv, sqkv = rand_qkv(rng, 5, 7, D_T), rand_qkv(rng, 5, 7, D_S)
  cast = lambda xs: tuple(jnp.asarray(x, dtype) for x in xs)
  up = lambda xs: tuple(jnp.asarray(x, jnp.float32) for x in xs)
  seg = np.array([[0, 0, 1, 1, 1, 0, 0]] * 5, np.int32)
  loss = lambda impl, t, st: minilm_v2_loss(t, st, MASK, 6, segment_ids=seg, implementation=impl)
  got, g_got = jax.value_and_grad(lambda st: loss("pallas_interpret", cast(tqkv), st))(cast(sqkv))
  want, g_want = jax.value_and_grad(lambda st: loss("xla", up(cast(tqkv)), st))(up(cast(sqkv)))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=RTOL)
  for g, w in zip(g_got, g_want):
    assert g.dtype == dtype
    if dtype == jnp.float32:
      np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-7)
    else:  # bf16 cotangents: rounded, and q's two (a and b side) summed in bf16; exactness is
      # tests/test_relation_kernel.py's, before the rounding
      np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=2**-8 * np.abs(w).max())


# --------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunk_heads", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_equals_direct_values_and_gradients(chunk_heads, packed):
  rng = np.random.default_rng(12)
  mask, seg = (PACKED_MASK, PACKED_SEGMENTS) if packed else (MASK[:3, :], None)
  b, t = mask.shape
  tqkv, sqkv = rand_qkv(rng, b, t, D_T), rand_qkv(rng, b, t, D_S)

  def loss(s, chunk):
    return minilm_v1_loss(tqkv, s, mask, 4, segment_ids=seg, chunk_heads=chunk)

  direct, g_direct = jax.value_and_grad(loss)(sqkv, None)
  chunked, g_chunked = jax.value_and_grad(loss)(sqkv, chunk_heads)
  np.testing.assert_allclose(chunked, direct, rtol=1e-6)
  for gc, gd in zip(g_chunked, g_direct):
    np.testing.assert_allclose(gc, gd, rtol=RTOL, atol=1e-7)


def test_chunk_heads_equal_to_num_heads_is_direct():
  rng = np.random.default_rng(13)
  ta, tb, sa, sb = (rand(rng, 2, 5, 16) for _ in range(4))
  mask = np.ones((2, 5))
  f = lambda c: jax.make_jaxpr(lambda x: relation_kl(ta, tb, x, sb, mask, 4, chunk_heads=c))(sa)
  assert "scan" not in str(f(4)) and "scan" not in str(f(None))
  assert "scan" in str(f(2))


def test_automatic_chunking_kicks_in_for_large_relations(monkeypatch):
  assert losses._auto_chunk_heads(8, 12, 512) is None
  assert losses._auto_chunk_heads(8, 12, 2048) == 2  # 8·2·2048² = 2**26
  assert losses._auto_chunk_heads(64, 12, 2048) == 1
  rng = np.random.default_rng(14)
  ta, tb, sa, sb = (rand(rng, 2, 5, 16) for _ in range(4))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  direct = relation_kl(ta, tb, sa, sb, mask, 4)
  monkeypatch.setattr(losses, "_DIRECT_MAX_ELEMENTS", 2 * 2 * 5 * 5)  # room for 2 of the 4 heads
  assert losses._auto_chunk_heads(2, 4, 5) == 2
  assert "scan" in str(jax.make_jaxpr(lambda x: relation_kl(ta, tb, x, sb, mask, 4))(sa))
  np.testing.assert_allclose(relation_kl(ta, tb, sa, sb, mask, 4), direct, rtol=1e-6)


def test_chunked_path_uses_less_temp_memory():
  # Compiled (not run) value-and-gradient step; XLA's buffer assignment reports the temp memory.
  b, t, heads, d = 2, 512, 16, 512
  shapes = [jax.ShapeDtypeStruct((b, t, d), jnp.float32)] * 4
  mask = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(chunk_heads):
    def step(ta, tb, sa, sb, m):
      return jax.value_and_grad(
          lambda s: relation_kl(jax.lax.stop_gradient(ta), tb, s, sb, m, heads, chunk_heads=chunk_heads)
      )(sa)

    stats = jax.jit(step).lower(*shapes, mask).compile().memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes

  direct, chunked = temp_bytes(heads), temp_bytes(1)  # chunk_heads = A: the direct path
  if direct is None or chunked is None:
    pytest.skip("memory_analysis() unavailable on this backend")
  full = b * heads * t * t * 4  # one fp32 [B, A, T, T] tensor: 32 MiB
  assert direct >= full  # the direct path holds (several) full relation tensors...
  assert chunked < full, (chunked, direct)  # ...the chunked one never holds even one
  assert chunked < direct / 4, (chunked, direct)


# ------------------------------------------------------------------------------------ blockwise KL


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("block", [1, 3, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_blockwise_equals_oracle_and_direct_values_and_gradients(version, block, packed):
  # Left and right padding, a fully padded row and a length-1 row (MASK), or packed documents; key
  # blocks that do not divide T (3), one key at a time (1), and one block wider than T (64).
  rng = np.random.default_rng(21)
  mask, seg = (PACKED_MASK, PACKED_SEGMENTS) if packed else (MASK, None)
  b, t = mask.shape
  tqkv, sqkv = rand_qkv(rng, b, t, D_T), rand_qkv(rng, b, t, D_S)
  loss_fn, oracle = (minilm_v1_loss, oracle_v1) if version == "v1" else (minilm_v2_loss, oracle_v2)

  def loss(t_, s_, block_keys):
    return loss_fn(t_, s_, mask, 4, segment_ids=seg, block_keys=block_keys)

  direct, (gt_d, gs_d) = jax.value_and_grad(loss, argnums=(0, 1))(tqkv, sqkv, None)
  blockwise, (gt_b, gs_b) = jax.value_and_grad(loss, argnums=(0, 1))(tqkv, sqkv, block)
  np.testing.assert_allclose(blockwise, oracle(tqkv, sqkv, mask, 4, segment_ids=seg), rtol=RTOL)
  np.testing.assert_allclose(blockwise, direct, rtol=RTOL)
  for gb, gd in zip(gt_b + gs_b, gt_d + gs_d):  # teacher and student sides, q, k and v
    np.testing.assert_allclose(gb, gd, rtol=RTOL, atol=1e-6)


def test_blockwise_left_padding_equals_right_padding():
  rng = np.random.default_rng(22)
  t = 9
  lengths = [9, 5, 2]
  tqkv, sqkv = rand_qkv(rng, 3, t, D_T), rand_qkv(rng, 3, t, D_S)
  right = np.array([[1] * n + [0] * (t - n) for n in lengths])
  shift = lambda x: np.stack([np.roll(x[i], t - n, axis=0) for i, n in enumerate(lengths)])
  left = shift(right)
  f = lambda tq, sq, m: minilm_v2_loss(tq, sq, m, 4, block_keys=4)
  np.testing.assert_allclose(f(tuple(map(shift, tqkv)), tuple(map(shift, sqkv)), left),
                             f(tqkv, sqkv, right), rtol=RTOL)


def test_blockwise_gradients_match_finite_differences_in_float64():
  rng = np.random.default_rng(23)
  with jax.enable_x64(True):
    mask = np.array([[1, 1, 1, 0, 1], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    seg = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 2], [0, 0, 0, 0, 0]])
    ta, tb = (jnp.asarray(rng.standard_normal((3, 5, 8))) for _ in range(2))
    sa, sb = (jnp.asarray(rng.standard_normal((3, 5, 4))) for _ in range(2))
    for segment_ids in (None, seg):
      f = lambda *x: relation_kl(*x, mask, 2, segment_ids=segment_ids, block_keys=2)
      assert f(ta, tb, sa, sb).dtype == jnp.float64
      check_grads(f, (ta, tb, sa, sb), order=1, modes=["rev"])


def _largest_intermediate(jaxpr) -> int:
  """Elements of the largest array any equation (scan and remat bodies included) produces."""
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      best = max(best, int(np.prod(getattr(v.aval, "shape", ()) or (1,))))
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          best = max(best, _largest_intermediate(inner))
  return best


def test_blockwise_never_holds_a_full_relation_tensor():
  # The jaxpr of value-and-gradient, forward and the custom backward: nothing of B·A·T·T elements.
  b, t, heads, block = 2, 256, 4, 32
  ta, tb, sa, sb = (jax.ShapeDtypeStruct((b, t, 32), jnp.float32) for _ in range(4))
  mask, seg = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32)

  def grads(**kw):
    return jax.make_jaxpr(jax.value_and_grad(
        lambda *x: relation_kl(*x[:4], x[4], heads, segment_ids=x[5], **kw),
        argnums=(0, 1, 2, 3)))(ta, tb, sa, sb, mask, seg).jaxpr

  full = b * heads * t * t
  assert _largest_intermediate(grads(chunk_heads=heads)) >= full  # the direct path does hold one
  assert _largest_intermediate(grads(block_keys=block)) <= b * heads * t * block < full
  # And the automatic choice at this length is blockwise (128 keys).
  assert _largest_intermediate(grads()) <= b * heads * t * 128 < full


def test_automatic_path_is_blockwise_above_128_tokens_only():
  assert losses._auto_block_keys(128) is None and losses._auto_block_keys(129) == 128
  rng = np.random.default_rng(25)
  for t in (128, 160):
    tqkv, sqkv = rand_qkv(rng, 2, t, 16), rand_qkv(rng, 2, t, 16)
    f = lambda s, **kw: minilm_v2_loss(tqkv, s, np.ones((2, t)), 4, **kw)
    jaxpr = str(jax.make_jaxpr(f)(sqkv))
    assert ("custom_vjp" in jaxpr) == (t > 128), t
    np.testing.assert_allclose(f(sqkv), f(sqkv, chunk_heads=4), rtol=RTOL)


def test_blockwise_bad_block_is_an_error():
  rng = np.random.default_rng(24)
  t, s = rand_qkv(rng, 2, 5, 16), rand_qkv(rng, 2, 5, 16)
  for bad in (0, -4, 2.5):
    with pytest.raises(ValueError, match="block_keys must be a positive int"):
      minilm_v2_loss(t, s, np.ones((2, 5)), 4, block_keys=bad)


# --------------------------------------------------------------------------------------- gradients


def test_gradients_match_finite_differences_in_float64():
  # float64 inputs are computed in float64 (the loss only ever casts *up* to fp32), so the
  # finite-difference check can run at check_grads' default (tight) tolerances.
  rng = np.random.default_rng(15)
  with jax.enable_x64(True):
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    seg = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    ta, tb = (jnp.asarray(rng.standard_normal((3, 4, 8))) for _ in range(2))
    sa, sb = (jnp.asarray(rng.standard_normal((3, 4, 4))) for _ in range(2))
    assert sa.dtype == jnp.float64
    for chunk_heads, segment_ids in ((None, None), (1, seg)):
      f = lambda *x: relation_kl(*x, mask, 2, segment_ids=segment_ids, chunk_heads=chunk_heads)
      assert f(ta, tb, sa, sb).dtype == jnp.float64
      check_grads(f, (ta, tb, sa, sb), order=1, modes=["rev"])


def test_teacher_gets_no_gradient_student_does():
  rng = np.random.default_rng(16)
  tqkv, sqkv = rand_qkv(rng, 5, 7, D_T), rand_qkv(rng, 5, 7, D_S)

  def loss(t, s):
    return minilm_v2_loss(jax.tree.map(jax.lax.stop_gradient, t), s, MASK, 6)

  g_t, g_s = jax.grad(loss, argnums=(0, 1))(tqkv, sqkv)
  assert all(np.all(np.asarray(g) == 0.0) for g in g_t)
  assert all(np.any(np.asarray(g) != 0.0) for g in g_s)


# ------------------------------------------------------------------------------------------ errors


def _qkv(b, t, d, widths=None):
  return tuple(jnp.zeros((b, t, w)) for w in (widths or (d, d, d)))


def test_error_heads_do_not_divide_widths():
  x384 = jnp.zeros((1, 4, 384))
  mask = jnp.ones((1, 4))
  with pytest.raises(ValueError, match="relation heads 5 do not divide teacher width 384"):
    relation_kl(x384, x384, x384, x384, mask, 5)
  with pytest.raises(ValueError, match="relation heads 48 do not divide student width 256"):
    minilm_v2_loss(_qkv(1, 4, 384), _qkv(1, 4, 256), mask, 48)


def test_error_v1_head_count_mismatch():
  with pytest.raises(ValueError, match="teacher 12 vs student 6"):
    minilm_v1_loss(_qkv(1, 4, 48), _qkv(1, 4, 24), jnp.ones((1, 4)), 12, student_num_heads=6)


def test_error_shape_mismatches():
  mask = jnp.ones((2, 4))
  with pytest.raises(
      ValueError, match=r"teacher \[B, T\] = \(2, 4\) does not match student \[B, T\] = \(3, 4\)"
  ):
    minilm_v1_loss(_qkv(2, 4, 8), _qkv(3, 4, 8), mask, 2)
  with pytest.raises(ValueError, match=r"\(2, 4\) does not match student \[B, T\] = \(2, 5\)"):
    minilm_v2_loss(_qkv(2, 4, 8), _qkv(2, 5, 8), mask, 2)
  with pytest.raises(ValueError, match=r"mask shape \(2, 5\) does not match inputs \[B, T\] = \(2, 4\)"):
    minilm_v1_loss(_qkv(2, 4, 8), _qkv(2, 4, 8), jnp.ones((2, 5)), 2)
  with pytest.raises(ValueError, match=r"segment_ids shape \(2,\) does not match inputs \[B, T\] = \(2, 4\)"):
    minilm_v1_loss(_qkv(2, 4, 8), _qkv(2, 4, 8), mask, 2, segment_ids=jnp.zeros((2,), jnp.int32))
  with pytest.raises(
      ValueError, match=r"student q/k/v shapes differ: q \(2, 4, 8\), k \(2, 4, 8\), v \(2, 4, 16\)"
  ):
    minilm_v2_loss(_qkv(2, 4, 8), _qkv(2, 4, 8, (8, 8, 16)), mask, 2)
  with pytest.raises(ValueError, match=r"teacher q/k/v shapes differ: q \(2, 4, 16\), k \(2, 4, 8\)"):
    minilm_v1_loss(_qkv(2, 4, 8, (16, 8, 8)), _qkv(2, 4, 8), mask, 2)
  with pytest.raises(
      ValueError, match=r"teacher relation inputs differ in shape: \(2, 4, 8\) vs \(2, 4, 16\)"
  ):
    relation_kl(
        jnp.zeros((2, 4, 8)), jnp.zeros((2, 4, 16)), jnp.zeros((2, 4, 8)), jnp.zeros((2, 4, 8)), mask, 2
    )


def test_error_bad_reduction_chunk_heads_weights():
  mask = jnp.ones((2, 4))
  t, s = _qkv(2, 4, 8), _qkv(2, 4, 8)
  with pytest.raises(ValueError, match="reduction must be one of .*'mean'"):
    minilm_v1_loss(t, s, mask, 2, reduction="mean")
  with pytest.raises(ValueError, match="chunk_heads 3 does not divide relation heads 4"):
    minilm_v2_loss(t, s, mask, 4, chunk_heads=3)
  with pytest.raises(ValueError, match="expected 3 loss weights, got 2"):
    minilm_v2_loss(t, s, mask, 4, weights=(1.0, 1.0))
  with pytest.raises(ValueError, match="expected 2 loss weights, got 3"):
    minilm_v1_loss(t, s, mask, 4, weights=(1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------ output alignment


def oracle_embedding(h, mask, pooling, normalize):
  """sentence-transformers' pooling of each row's real tokens, float64, one row at a time."""
  out = []
  for b in range(h.shape[0]):
    x = h[b, np.asarray(mask[b]) != 0].astype(np.float64)
    if len(x) == 0:
      e = np.zeros(h.shape[-1])
    elif pooling == "mean":
      e = x.mean(0)
    elif pooling == "cls":
      e = x[0]
    elif pooling == "max":
      e = x.max(0)
    else:
      e = x.sum(0) / np.sqrt(len(x))
    if normalize:
      e = e / max(np.linalg.norm(e), 1e-12)
    out.append(e)
  return np.stack(out)


def oracle_hidden(th, sh, mask, reduction="example", segment_ids=None):
  """Mean of 1 − cos over each example's (document's) real tokens, then over examples; or over tokens."""
  per_doc, tokens = [], []
  for b, idx in _documents(np.asarray(mask), segment_ids):
    t, s = th[b, idx].astype(np.float64), sh[b, idx].astype(np.float64)
    d = 1 - (t * s).sum(-1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(s, axis=-1))
    per_doc.append(d.mean())
    tokens.extend(d)
  if not per_doc:
    return 0.0
  return float(np.mean(per_doc) if reduction == "example" else np.mean(tokens))


def oracle_embedding_loss(te, se, mask):
  rows = [b for b in range(te.shape[0]) if np.asarray(mask[b]).any()]
  if not rows:
    return 0.0
  return float(np.mean([((te[b].astype(np.float64) - se[b]) ** 2).sum() for b in rows]))


@pytest.mark.parametrize("pooling", losses.POOLING_MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_sentence_embedding_matches_oracle(pooling, normalize):
  h = rand(np.random.default_rng(0), 5, 7, D_T)
  got = losses.sentence_embedding(jnp.asarray(h), MASK, pooling, normalize)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, oracle_embedding(h, MASK, pooling, normalize), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("reduction", ["example", "token"])
def test_hidden_loss_matches_oracle(reduction):
  rng = np.random.default_rng(1)
  th, sh = rand(rng, 5, 7, D_T), rand(rng, 5, 7, D_T)
  got = losses.hidden_loss(th, sh, MASK, reduction)
  np.testing.assert_allclose(got, oracle_hidden(th, sh, MASK, reduction), rtol=RTOL)
  np.testing.assert_allclose(losses.hidden_loss(th, th, MASK, reduction), 0.0, atol=1e-6)


def test_hidden_loss_packed_equals_documents_alone():
  rng = np.random.default_rng(2)
  th, sh = rand(rng, 2, 8, D_T), rand(rng, 2, 8, D_T)
  mask = np.array([[1] * 8, [1] * 6 + [0] * 2], np.int32)
  seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1, 0, 0]], np.int32)
  for reduction in ("example", "token"):
    got = losses.hidden_loss(th, sh, mask, reduction, segment_ids=seg)
    np.testing.assert_allclose(got, oracle_hidden(th, sh, mask, reduction, seg), rtol=RTOL)


def test_embedding_loss_matches_oracle_and_skips_empty_rows():
  rng = np.random.default_rng(3)
  te, se = rand(rng, 5, D_T), rand(rng, 5, D_T)
  np.testing.assert_allclose(losses.embedding_loss(te, se, MASK), oracle_embedding_loss(te, se, MASK),
                             rtol=RTOL)
  assert float(losses.embedding_loss(te, se, np.zeros_like(MASK))) == 0.0


@pytest.mark.parametrize("pooling", losses.POOLING_MODES)
def test_output_terms_equal_for_left_and_right_padding_and_alone(pooling):
  # The same sequences padded on either side (and computed alone, unpadded) give the same values.
  rng = np.random.default_rng(4)
  lengths = [7, 3, 1, 5]
  th, sh = rand(rng, 4, 7, D_T), rand(rng, 4, 7, D_T)
  right, left = np.zeros((4, 7), np.int32), np.zeros((4, 7), np.int32)
  th_l, sh_l = np.zeros_like(th), np.zeros_like(sh)
  for b, n in enumerate(lengths):
    right[b, :n] = 1
    left[b, 7 - n:] = 1
    th_l[b, 7 - n:], sh_l[b, 7 - n:] = th[b, :n], sh[b, :n]

  def both(t, s, m):
    emb = lambda h: losses.sentence_embedding(jnp.asarray(h), m, pooling, True)
    return (float(losses.hidden_loss(t, s, m)), float(losses.embedding_loss(emb(t), emb(s), m)))

  r, l = both(th, sh, right), both(th_l, sh_l, left)
  np.testing.assert_allclose(r, l, rtol=RTOL)
  alone = [both(th[b:b + 1, :n], sh[b:b + 1, :n], np.ones((1, n), np.int32)) for b, n in enumerate(lengths)]
  np.testing.assert_allclose(r, np.mean(alone, axis=0), rtol=RTOL)


def test_output_terms_gradients_match_finite_differences_in_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    th = jnp.asarray(rng.standard_normal((3, 5, 8)))
    sh = jnp.asarray(rng.standard_normal((3, 5, 8)))
    assert sh.dtype == jnp.float64
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    emb = lambda h: losses.sentence_embedding(h, mask, "mean", True)
    check_grads(lambda s: losses.hidden_loss(th, s, mask), (sh,), order=1, modes=["rev"])
    check_grads(lambda s: losses.embedding_loss(emb(th), emb(s), mask), (sh,), order=1, modes=["rev"])


def test_output_terms_errors():
  h = np.zeros((2, 3, 4), np.float32)
  with pytest.raises(ValueError, match="pooling 'first'"):
    losses.sentence_embedding(h, np.ones((2, 3)), "first")
  with pytest.raises(ValueError, match="project the student first"):
    losses.hidden_loss(h, np.zeros((2, 3, 5), np.float32), np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    losses.hidden_loss(h, h, np.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    losses.embedding_loss(np.zeros((2, 4)), np.zeros((2, 5)), np.ones((2, 3)))
