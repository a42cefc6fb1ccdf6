"""The static plan of one attention_kernel.attention call: its blocks (largest VMEM holds; under a window,
least work plus grid-step overhead), the band of blocks a window reaches, and what the kernels cost
(their CostEstimates, replaying the index maps), apart from the kernels themselves (attention_kernel.py).
"""

import math
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from minilm_jax import kernel_blocks

_LANES = kernel_blocks.LANES
# A grid step's overhead (~0.35 µs) as the work of so many (query, key) pairs (~4e-11 s each, forward
# and backward, heads of 64 with dropout: estimated, not measured on a TPU): the automatic blocks under a
# window weigh the steps that smaller blocks add against the work they skip.
STEP_PAIRS = 8192

class Plan(NamedTuple):
  """Static shapes of one attention call (hashable: the custom VJP's non-differentiable argument)."""
  batch: int
  heads: int
  t: int          # the caller's T: the dropout counter's row stride
  tp: int         # T padded to a multiple of the blocks
  dh: int         # head width
  dw: int         # head width padded to divide 128 (or to a multiple of 128)
  hc: int         # heads per grid step
  bq: int
  bk: int
  threshold: int  # dropout: drop where the 16 hash bits < threshold; 0: no dropout
  dtype: str      # of q, k, v and the outputs
  interpret: bool
  window: Optional[int] = None  # keys within ±window of the query; None: all (also any window ≥ T − 1)

  @property
  def groups(self):
    return self.heads // self.hc

  @property
  def width(self):  # W: lanes of a grid step
    return self.hc * self.dw

  @property
  def nq(self):
    return self.tp // self.bq

  @property
  def nk(self):
    return self.tp // self.bk

  @property
  def scale(self):
    return 1.0 / math.sqrt(self.dh)

  @property
  def inv_keep(self):
    return 65536.0 / (65536 - self.threshold)

  @property
  def itemsize(self):
    return jnp.dtype(self.dtype).itemsize

  @property
  def kband(self):
    """Forward grid steps per query block: the most key blocks one query block's reach meets."""
    return self._band(False)

  @property
  def qband(self):
    """Backward grid steps per key block: the most query blocks that reach one key block."""
    return self._band(True)

  @property
  def visits(self):
    """(query block, key block) pairs that do work, of nq·nk: the same in both kernels."""
    return sum(hi - lo + 1 for lo, hi in map(lambda i: self.reach(i, False), range(self.nq)))

  def _band(self, keys_outer):
    n_out = self.nk if keys_outer else self.nq
    return max(hi - lo + 1 for lo, hi in map(lambda x: self.reach(x, keys_outer), range(n_out)))

  def reach(self, x, keys_outer):
    """First and last inner block that outer block x meets (x a Python int or a traced int32): the key
    blocks holding a key within ±window of a query of query block x (keys_outer False), or the query
    blocks holding a query within ±window of a key of key block x (True); every inner block without a
    window. A block pair meets or not whichever side is outer: both kernels do the same pairs."""
    b_out, b_in, n_in = (self.bk, self.bq, self.nq) if keys_outer else (self.bq, self.bk, self.nk)
    if self.window is None:
      return 0, n_in - 1
    first = _div(_max(x * b_out - self.window, 0), b_in)
    return first, _min(_div(x * b_out + (b_out - 1 + self.window), b_in), n_in - 1)

  def band_start(self, x, keys_outer):
    """Inner block of outer block x's first band step: its reach's first block, moved back where the
    band would run past the last block (the steps past the reach are skipped)."""
    n_in = self.nq if keys_outer else self.nk
    return _min(self.reach(x, keys_outer)[0], n_in - self._band(keys_outer))

  @property
  def precision(self):
    # fp32 inputs get fp32 matmuls (several bf16 MXU passes); bf16 ones a single pass, as XLA's.
    return jax.lax.Precision.HIGHEST if self.dtype == "float32" else jax.lax.Precision.DEFAULT


# Scalar arithmetic on block indices that are Python ints (the plan's static counts, cost's replay of
# the index maps) or traced int32 (index maps, kernels: lax.div, as the operands are never negative).
_static = lambda *xs: all(isinstance(x, int) for x in xs)
_max = lambda a, b: max(a, b) if _static(a, b) else jnp.maximum(a, b)
_min = lambda a, b: min(a, b) if _static(a, b) else jnp.minimum(a, b)
_div = lambda a, b: a // b if _static(a) else jax.lax.div(a, jnp.int32(b))
_select = lambda c, a, b: (a if c else b) if _static(c, a, b) else jnp.where(c, a, b)


# --------------------------------------------------------------------------------------------- plan


def vmem_bytes(bq, bk, tp, width, itemsize):
  """VMEM of the larger kernel (the backward), from above: double-buffered q, O, dO, k, v blocks and dk,
  dv outputs, the dq output and accumulator of the whole sequence, the D rows, the dk, dv, dq
  accumulators, and Mosaic's temporaries per (key, query) pair of a block: ~28 bytes with bf16 inputs,
  ~60 with fp32 (HIGHEST-precision matmuls split their operands into bf16 parts). Fitted to Mosaic's own
  figures for v5e (the least vmem_limit_bytes that compiles), 512 x 512 blocks, W = 128: bf16 9.3 MiB
  at T = 512 (10.0 estimated), 11.5 at 2048 (11.6); fp32 19.9 at 512 (20.0). The forward needs less
  (5.5, 6.5; fp32 10.4)."""
  blocks = 2 * (3 * bq + 4 * bk) * width * itemsize
  dq = tp * width * (4 + 2 * itemsize) + tp * 8 * 4  # and the D rows
  per_pair = 28 if itemsize == 2 else 60
  return blocks + dq + 2 * bk * width * 4 + bq * width * 4 + per_pair * bq * bk


def window_block(t, window, vmem_bytes):
  """Automatic blocks under a window: of the blocks kernel_blocks.auto_block may choose (those that pad T
  no further than 128-alignment does and fit VMEM), the one of least work + overhead,
  visits·B² + steps·STEP_PAIRS (grid steps nq·band: the band's edge steps cost their overhead too).
  A query block of B meets 1 + 2⌈w/B⌉ key blocks, so blocks near w waste the least, but many small
  blocks pay the step overhead: at T = 512, w = 64 blocks of 128 do 10 of 16 block pairs in 12 steps
  (estimated 3% cheaper than one 512-block), at w = 256 they would do 14 of 16 in 16 steps (the full
  512 wins)."""
  def score(b):
    plan = Plan(1, 1, t, -(-t // b) * b, 1, 1, 1, b, b, 0, "float32", True, window)
    return plan.visits * b * b + plan.nq * plan.kband * STEP_PAIRS
  t128 = -(-t // _LANES) * _LANES
  largest = kernel_blocks.auto_block(t, vmem_bytes)  # smaller blocks need less VMEM
  fits = [b for b in kernel_blocks.BLOCKS if b <= largest and -(-t // b) * b == t128]  # 128 always
  return min(fits, key=lambda b: (score(b), -b))  # ties: the larger


def make_plan(batch, heads, t, dh, dtype, block_q, block_k, threshold, interpret, window=None):
  if window is not None:
    window = operator.index(window)
    if window < 0:
      raise ValueError(f"window must be None or ≥ 0, got {window}")
    if window >= t - 1:  # every pair of positions lies within it
      window = None
  dw = kernel_blocks.lane_width(dh)
  hc = kernel_blocks.heads_per_step(heads, dw)
  itemsize = jnp.dtype(dtype).itemsize
  vmem = lambda b: vmem_bytes(b, b, -(-t // b) * b, hc * dw, itemsize)
  auto = lambda: (kernel_blocks.auto_block(t, vmem) if window is None
                  else window_block(t, window, vmem))
  bq, bk, tp = kernel_blocks.blocks(t, block_q, block_k, auto)
  return Plan(batch, heads, t, tp, dh, dw, hc, bq, bk, threshold,
               jnp.dtype(dtype).name, bool(interpret), window)


# ----------------------------------------------------------------------------------------------- cost


def _elementwise_per_pair(plan, backward):
  """VPU operations per (query, key) pair and head: scale, mask, max or subtract, sum, casts (forward);
  scale, mask, subtract, the dS arithmetic and casts (backward); with dropout half the pair hash (two
  fmix32 rounds: 18 integer ops, shared by two heads), the counter, the 16-bit half, compare, selects;
  with a window its mask (offset, two compares, and: shared by the step's heads)."""
  base = 8 if not backward else 10
  return (base + ((13 if not backward else 14) if plan.threshold else 0)
          + (-(-4 // plan.hc) if plan.window is not None else 0))


def inner_block(plan, keys_outer, x, step):
  """Grid (outer block x, band step) -> the inner block whose data the step reads: the band's block,
  clamped into x's reach, so that the band's edge steps, which do no work, repeat their neighbour's block
  index (Pallas copies a block only when its index changes). Python ints or traced int32."""
  lo, hi = plan.reach(x, keys_outer)
  inner = plan.band_start(x, keys_outer) + step
  return inner if plan.window is None else _min(_max(inner, lo), hi)


def o_block(plan, j, step):
  """The backward's O block at (key block j, band step): query block i at the first key block it meets
  (where D is computed), else the last block read: max(reach(j − 1)'s last, min(i, reach(j)'s last)),
  as the query blocks meet their first key blocks in order. Without a window: i in the first key-block
  sweep, nq − 1 after it."""
  i = plan.band_start(j, True) + step
  last, last_before = plan.reach(j, True)[1], plan.reach(_max(j - 1, 0), True)[1]
  return _select(j == 0, _min(i, last), _max(last_before, _min(i, last)))


def _copies(plan, keys_outer, index):
  """Blocks one (b, group) copies of an input with block index index(x, step) over its grid (x, step):
  the first, then each change."""
  n_out, band = (plan.nk, plan.qband) if keys_outer else (plan.nq, plan.kband)
  seq = [index(x, step) for x in range(n_out) for step in range(band)]
  return 1 + sum(a != b for a, b in zip(seq, seq[1:]))


def cost(plan, kind):
  """CostEstimate of one kernel. Flops count the MXU work issued in the block pairs that do work (each
  head contracts over the step's W lanes: 2 matmuls forward, 5 backward, 6 bf16 passes each for fp32;
  every pair without a window, those within its reach with one) and the elementwise work per pair;
  transcendentals the exp per pair (and per row and key block); bytes count every block DMA'd, replaying the
  index maps: the outer side's
  once, the inner side's once per outer block (once in all with a single inner block: Pallas skips an
  unchanged block), with a window only the blocks in reach."""
  b, g, tp, w, isz = plan.batch, plan.groups, plan.tp, plan.width, plan.itemsize
  passes = kernel_blocks.mxu_passes(plan.precision)  # fp32 inputs: 6 bf16 passes a matmul
  pairs = b * plan.heads * plan.visits * plan.bq * plan.bk  # b·heads·Tp² without a window
  rows, row_blocks = b * plan.heads * tp, b * plan.heads * plan.visits * plan.bq
  side = b * tp * g * w * isz        # one [B, Tp, H·dw] array
  kvalid = b * tp * 4
  if kind == "forward":
    k_copies = _copies(plan, False, lambda i, step: inner_block(plan, False, i, step))
    return pl.CostEstimate(
        flops=(pairs * (4 * w * passes + _elementwise_per_pair(plan, False)) + row_blocks * 6
               + 3 * side // isz),
        transcendentals=pairs + row_blocks + rows,
        # q in, o out, lse out; k, v and the key mask as often as their blocks are copied.
        bytes_accessed=2 * side + rows * 4 + k_copies * (2 * side + g * kvalid) // plan.nk + b * 4)
  q_copies = _copies(plan, True, lambda j, step: inner_block(plan, True, j, step))
  o_copies = _copies(plan, True, lambda j, step: o_block(plan, j, step))
  return pl.CostEstimate(
      # + D: an fp32 (6-pass) [hc8, W] x [W, bq] matmul per query block and group.
      flops=pairs * (10 * w * passes + _elementwise_per_pair(plan, True)) + b * g * tp * w * (2 * 8 * 6 + 2),
      transcendentals=pairs,
      # k, v and key mask once, O about once; q, dO and lse as often as their blocks are copied; dq, dk,
      # dv out.
      bytes_accessed=(2 * side + g * kvalid + o_copies * side // plan.nq
                      + q_copies * (2 * side + rows * 4) // plan.nq + 3 * side + b * 4))
