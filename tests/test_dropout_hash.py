"""dropout_hash: the attention kernel's dropout mask, drawn densely (keep_mask): the fraction kept, the
independence of heads, keys and rows, determinism, and the rate's range."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import dropout_hash

RATE = 0.1
KEEP = 1.0 - round(RATE * 65536) / 65536  # model.dropout's keep probability


def _seeds(b, seed=0):
  return jax.random.bits(jax.random.key(seed), (b,), jnp.uint32)


def test_mask_keeps_the_right_fraction_and_is_deterministic():
  b, h, t = 4, 12, 256
  seeds = _seeds(b, seed=3)
  keep = np.asarray(dropout_hash.keep_mask(seeds, h, t, RATE))
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
  np.testing.assert_array_equal(dropout_hash.keep_mask(seeds, h, t, RATE), keep)  # identical between calls
  assert np.asarray(dropout_hash.keep_mask(seeds, h, t, 0.0)).all()
  np.testing.assert_allclose(np.asarray(dropout_hash.keep_mask(seeds, h, t, 0.5)).mean(), 0.5, atol=2e-3)


def test_different_seeds_give_different_masks():
  h, t = 4, 64
  seeds = np.array([0, 1, 2**31, 2**32 - 1], np.uint32)
  keep = np.asarray(dropout_hash.keep_mask(seeds, h, t, RATE))
  masks = keep.reshape(len(seeds) * h, -1)  # every (row, head) a mask of its own
  differ = (masks[:, None, :] != masks[None, :, :]).mean(-1)
  off_diagonal = differ[~np.eye(len(masks), dtype=bool)]
  # Two independent masks differ in 2·keep·(1 − keep) of their entries (0.18).
  assert off_diagonal.min() > 0.15 and off_diagonal.max() < 0.21
  np.testing.assert_array_equal(dropout_hash.keep_mask(seeds[2:3], h, t, RATE), keep[2:3])  # per row, not batch


def test_threshold_is_the_rate_in_16_bits_and_refuses_a_bad_rate():
  assert dropout_hash.threshold(0.0) == 0 and dropout_hash.threshold(0.1) == 6554
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match="dropout rate must be in"):
      dropout_hash.threshold(bad)
