"""The attention kernel's dropout mask: 16 uniform bits per (batch row, head, query, key) from a
counter-based hash of the row's seed, the head pair and t·T + s, so that the kernel draws, block by block
in VMEM, exactly the mask that keep_mask builds densely (attention_kernel.py; tests compare them).
model.dropout draws its TPU and GPU bits from hash32 too.
"""

import functools

import jax
import jax.numpy as jnp

# murmur3's fmix32 multipliers and the golden ratio, as int32 (the hash runs on int32 with wrapping
# multiplies and logical shifts: Mosaic's vector units and XLA give the same bits).
_as_i32 = lambda c: c - (1 << 32) if c >= 1 << 31 else c
_FMIX1, _FMIX2, _GOLDEN = _as_i32(0x85EBCA6B), _as_i32(0xC2B2AE35), _as_i32(0x9E3779B9)


def threshold(rate):
  """Dropped where 16 uniform bits < threshold: the rate exact to 1/65536, as model.dropout."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  return round(rate * 65536)


def fmix32(x):
  """murmur3's 32-bit finaliser on int32: a bijection, every output bit depends on every input bit."""
  srl = lambda y, n: jax.lax.shift_right_logical(y, jnp.int32(n))
  x = (x ^ srl(x, 16)) * _FMIX1
  x = (x ^ srl(x, 13)) * _FMIX2
  return x ^ srl(x, 16)


def pair_key(seed, pair):
  """int32 key of batch row `seed` (int32: the caller's uint32 bits) and head pair `pair` (heads 2·pair
  and 2·pair + 1 share one 32-bit hash per position: the low 16 bits go to the even head, the high 16 to
  the odd one, which halves the hashing on the vector units)."""
  return fmix32(seed + fmix32((pair + 1) * _GOLDEN))


def hash32(key, counter):
  """32 hash bits per counter (int32, t·T + s). Two rounds with the key folded in before each: with one
  round of a bijection two keys' masks would be the same bits permuted."""
  return fmix32(fmix32(counter ^ key) + key)


def pair_bits(seed, pair, counter):
  """The 32 bits of head pair `pair` at `counter` for batch row `seed` (both heads' 16 bits)."""
  return hash32(pair_key(seed, pair), counter)


def half16(x, odd):
  """The 16 bits of a pair's hash x that belong to the even (odd = 0) or odd (odd = 1) head."""
  return jax.lax.shift_right_logical(x, jnp.int32(16) * odd) & 0xFFFF


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def keep_mask(seeds_B, num_heads, t, rate):
  """attention_kernel's dropout mask, densely in plain jnp: bool [B, H, T, T], True where kept."""
  cut = threshold(rate)
  seeds_B = jax.lax.bitcast_convert_type(jnp.asarray(seeds_B, jnp.uint32), jnp.int32)
  heads = jnp.arange(num_heads, dtype=jnp.int32)
  keys_BH = pair_key(seeds_B[:, None], heads[None, :] // 2)
  pos = jnp.arange(t, dtype=jnp.int32)
  counter_TT = pos[:, None] * t + pos[None, :]
  bits_BHTT = half16(hash32(keys_BH[:, :, None, None], counter_TT), (heads % 2)[None, :, None, None])
  return bits_BHTT >= cut
