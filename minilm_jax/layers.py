"""Dense and embedding layers whose weight gradients stay in the parameters' dtype under mixed precision.

With fp32 parameters and bf16 compute, flax's Dense casts the kernel to bf16 before the matmul, so the
kernel's gradient is a bf16 matmul over the (sharded) batch: each device sums its share in bf16 and XLA
all-reduces the bf16 partial sums before the cast back to fp32. flax's Embed casts the table to bf16
and gathers, so its gradient is a bf16 scatter-add (on a GPU, scalar 2-byte atomics; every token-type
and position row of a batch lands on a few rows). Here instead:
- `Dense`: the kernel's gradient is the bf16 matmul accumulated and returned in fp32
  (`preferred_element_type`), the bias's a fp32 sum, so the cross-device reduction is fp32; the forward
  pass is the same bf16 matmul;
- `embed` / `Embed`: rows are gathered from the fp32 table and cast afterwards, so the gradient is
  scattered in fp32; `Embed.first_rows` (positions 0..T-1) and `Embed.row` (a single token type)
  broadcast rows instead of gathering them, and `Embed.one_hot` (a few token types) is a matmul: their
  gradients are sums over the batch, not scatters at all.
With equal compute and parameter dtypes (fp32 runs, the bf16 teacher) they compute exactly what flax's
layers compute, in the same order.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


@jax.custom_vjp
def _mixed_dense(x_BI, kernel_IO, bias_O):
  """x [..., I] in the compute dtype, kernel [I, O] and bias [O] in the params' dtype."""
  y = jnp.dot(x_BI, kernel_IO.astype(x_BI.dtype), preferred_element_type=jnp.float32)
  return (y + bias_O).astype(x_BI.dtype)


def _mixed_dense_fwd(x_BI, kernel_IO, bias_O):
  return _mixed_dense(x_BI, kernel_IO, bias_O), (x_BI, kernel_IO)


def _mixed_dense_bwd(res, g_BO):
  x_BI, kernel_IO = res
  batch = tuple(range(g_BO.ndim - 1))
  dx = jnp.dot(g_BO, kernel_IO.astype(g_BO.dtype).T).astype(x_BI.dtype)
  dk = jax.lax.dot_general(x_BI, g_BO, ((batch, batch), ((), ())),
                           preferred_element_type=jnp.float32).astype(kernel_IO.dtype)
  db = g_BO.astype(jnp.float32).sum(batch).astype(kernel_IO.dtype)
  return dx, dk, db


_mixed_dense.defvjp(_mixed_dense_fwd, _mixed_dense_bwd)


class Dense(nn.Module):
  """flax.linen.Dense's params ("kernel" [I, O], "bias" [O]) and result, with fp32 weight gradients
  under mixed precision (module docstring). With `splits` = n > 1, the n equal parts of the result as a
  tuple, each its own matmul with its columns of the kernel (a fused Q/K/V projection whose parts are
  used apart: slicing one wide result made XLA:TPU copy each part out of it)."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  splits: int = 1

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias \
        else jnp.zeros((self.features,), self.param_dtype)
    if self.splits == 1:
      return _dense(x, kernel, bias, self.dtype, self.use_bias)
    o = self.features // self.splits
    return tuple(_dense(x, kernel[:, i * o:(i + 1) * o], bias[i * o:(i + 1) * o], self.dtype, self.use_bias)
                 for i in range(self.splits))


def _dense(x, kernel, bias, dtype, use_bias: bool):
  """x @ kernel + bias in `dtype`; under mixed precision (dtype other than the kernel's) by _mixed_dense."""
  if jnp.dtype(dtype) == jnp.dtype(kernel.dtype):
    y = jnp.dot(x.astype(dtype), kernel)
    return y + bias if use_bias else y
  return _mixed_dense(x.astype(dtype), kernel, bias)


def embed(table_VH, ids, dtype):
  """table[ids] in `dtype`, gathered in the table's dtype (so the gradient is scattered in it)."""
  return jnp.take(table_VH, ids, axis=0).astype(dtype)


class Embed(nn.Module):
  """flax.linen.Embed's param ("embedding" [V, H]) and lookup, gathered before the cast (`embed`)."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features),
                                self.param_dtype)

  def __call__(self, ids):
    return embed(self.embedding, ids, self.dtype)

  def first_rows(self, shape):
    """[B, T, H]: rows 0..T-1 for every row of a `shape` = (B, T) batch, as gathering them would give,
    with a gradient that is a sum over the batch (in the table's dtype), not a scatter. Rows past the
    table's end (T > num_embeddings) are gathered as before, with jnp.take's out-of-range handling."""
    if shape[-1] > self.num_embeddings:
      return self(jnp.broadcast_to(jnp.arange(shape[-1]), tuple(shape)))
    return jnp.broadcast_to(self.embedding[:shape[-1]], tuple(shape) + (self.features,)).astype(self.dtype)

  def row(self, index: int, shape):
    """[B, T, H]: row `index` everywhere (a constant id), its gradient a sum like first_rows'."""
    return jnp.broadcast_to(self.embedding[index], tuple(shape) + (self.features,)).astype(self.dtype)

  def one_hot(self, ids):
    """table[ids] as a one-hot matmul: for a table of a few rows (token types), whose gradient is then
    a matmul (a reduction) rather than many scatter-adds onto the same rows; exact in fp32."""
    hot = jax.nn.one_hot(ids, self.num_embeddings, dtype=self.embedding.dtype)
    return jnp.einsum("...v,vh->...h", hot, self.embedding).astype(self.dtype)
