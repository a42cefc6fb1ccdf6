"""Dense and embedding layers with fp32 weight gradients under bf16 compute (layers.py), against
float64 numpy oracles."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import layers


def _inputs(seed=0, b=3, t=5, i=16, o=24):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, t, i)).astype(np.float32),
          rng.standard_normal((b, t, o)).astype(np.float32))


def test_dense_with_one_dtype_is_flax_dense():
  x, _ = _inputs()
  ours, theirs = layers.Dense(24), nn.Dense(24)
  params = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(ours.apply(params, x), theirs.apply(params, x))


def test_mixed_dense_computes_in_bf16_and_returns_fp32_weight_gradients():
  x, g = _inputs(1)
  m = layers.Dense(24, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params = m.init(jax.random.key(0), x)
  y, vjp = jax.vjp(lambda p, x: m.apply(p, x), params, x)
  assert y.dtype == jnp.bfloat16
  f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)  # what bf16 compute sees
  k, b = params["params"]["kernel"], params["params"]["bias"]
  np.testing.assert_allclose(np.asarray(y, np.float64), f64(x) @ f64(k) + np.asarray(b, np.float64),
                             rtol=1e-2, atol=1e-2)  # bf16 output: 8 bits of mantissa
  gp, gx = vjp(jnp.asarray(g, jnp.bfloat16))
  dk, db = gp["params"]["kernel"], gp["params"]["bias"]
  assert dk.dtype == db.dtype == jnp.float32 and gx.dtype == jnp.float32
  # The kernel's gradient: bf16 products summed in fp32, exact to fp32 rounding (not bf16's).
  np.testing.assert_allclose(dk, np.einsum("bti,bto->io", f64(x), f64(g)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, f64(g).sum((0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_dense_is_the_whole_result_in_parts_with_the_same_gradients(dtype):
  """splits=3: the params of one [I, 3·O] Dense; each part is its columns of the whole result, and the
  kernel's and bias's gradients are the whole Dense's (fp32 under mixed precision)."""
  x, _ = _inputs(2, o=36)
  whole, parts = (layers.Dense(36, dtype=dtype, param_dtype=jnp.float32, splits=n) for n in (1, 3))
  params = whole.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, parts.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  y = whole.apply(params, x)
  got = parts.apply(params, x)
  assert len(got) == 3
  for i, part in enumerate(got):
    # the same products; a narrower matmul may sum them in another order (fp32 on CPU: last-bit changes)
    np.testing.assert_allclose(np.asarray(part, np.float32), np.asarray(y[..., i * 12:(i + 1) * 12], np.float32),
                               rtol=1e-5, atol=1e-6)
  w = jax.random.normal(jax.random.key(1), y.shape, jnp.float32)
  loss_whole = lambda p: (whole.apply(p, x).astype(jnp.float32) * w).sum()
  loss_parts = lambda p: (jnp.concatenate(parts.apply(p, x), -1).astype(jnp.float32) * w).sum()
  g_whole, g_parts = jax.grad(loss_whole)(params), jax.grad(loss_parts)(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g_whole, g_parts)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(g_parts))


def test_embedding_reads_equal_a_gather_and_their_gradients_are_not_scatters():
  e = layers.Embed(7, 4)
  ids = jnp.asarray([[0, 3, 6, 1], [2, 2, 0, 5]])
  params = e.init(jax.random.key(0), ids)
  table = np.asarray(params["params"]["embedding"], np.float64)
  call = lambda method, *a: e.apply(params, *a, method=method)
  np.testing.assert_array_equal(call(layers.Embed.__call__, ids), table[np.asarray(ids)])
  np.testing.assert_array_equal(call(layers.Embed.first_rows, (2, 4)), np.broadcast_to(table[:4], (2, 4, 4)))
  np.testing.assert_array_equal(call(layers.Embed.row, 0, (2, 4)), np.broadcast_to(table[0], (2, 4, 4)))
  np.testing.assert_allclose(call(layers.Embed.one_hot, ids), table[np.asarray(ids)], rtol=1e-6)
  # Their gradients, under bf16 compute: fp32, equal to the scatter-add of the cotangent's rows.
  g = np.random.default_rng(2).standard_normal((2, 4, 4)).astype(np.float32)
  want = np.zeros_like(table)
  np.add.at(want, np.asarray(ids), np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64))
  bf = layers.Embed(7, 4, dtype=jnp.bfloat16)
  grad = lambda f: jax.grad(lambda p: jnp.sum(f(p).astype(jnp.float32) * g))(params)["params"]["embedding"]
  for method in (layers.Embed.__call__, layers.Embed.one_hot):
    got = grad(lambda p: bf.apply(p, ids, method=method))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda p: grad(lambda q: bf.apply(q, (2, 4), method=layers.Embed.first_rows)))(
      params))
  assert "scatter" not in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda p: grad(lambda q: bf.apply(q, ids, method=layers.Embed.one_hot)))(params))
  assert "scatter" not in jaxpr


def test_first_rows_past_the_table_are_what_a_gather_gives():
  # A sequence longer than the position table (evaluation may pad past it): as the gather always did.
  e = layers.Embed(3, 2)
  params = e.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  got = e.apply(params, (2, 5), method=layers.Embed.first_rows)
  want = e.apply(params, jnp.broadcast_to(jnp.arange(5), (2, 5)))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
