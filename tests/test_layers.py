"""Dense and embedding layers with fp32 weight gradients under bf16 compute (layers.py), against
float64 numpy oracles."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
