"""Block planning shared by the Pallas TPU kernels (relation_kernel.py, attention_kernel.py): lane
padding of a head, heads per grid step, and the sequence blocks, chosen from the largest that VMEM holds.
"""

import math

import jax

# Masked logits and scores (losses.py uses the same): finite, so exp() underflows to exactly 0 and no
# inf − inf = NaN appears in the forward or backward pass; far below any real logit.
MASK_VALUE = -1e30
LANES = 128
# Block sizes tried from the largest: 512 x 512 keeps a grid step's work (hc heads of 512² pairs) far
# above the ~0.35 µs step overhead and re-reads the other side's blocks T/512 times; wider heads need
# more VMEM, so they step down.
BLOCKS = (512, 384, 256, 128)
# VMEM the automatic blocks may fill: all of a v4's, as its compiler reports it (v5p: 64 MiB, v5e and
# v6e: 128 MiB).
VMEM_BUDGET = 16 * 2**20


def mxu_passes(precision) -> int:
  """bf16 MXU passes of one matmul at `precision` on TPU: 6 for HIGHEST on fp32 operands (XLA's bf16_6x;
  Mosaic's contract_precision<fp32> is taken to be the same, it is not documented), 1 for DEFAULT on
  bf16. The kernels' CostEstimates multiply their MXU flops by it: the compiler's cost model cannot see a
  Pallas kernel's passes."""
  return 6 if precision == jax.lax.Precision.HIGHEST else 1


def lane_width(d: int) -> int:
  """d padded with zero lanes (zeros leave dot products alone) to divide 128 or be a multiple of it."""
  if d >= LANES:
    return -(-d // LANES) * LANES
  return 1 << (d - 1).bit_length()


def heads_per_step(heads: int, *widths: int) -> int:
  """Fewest heads whose lanes, at each of `widths`, fill whole 128-lane tiles; all heads if none do (a
  block as wide as the array needs no alignment)."""
  return next((hc for hc in range(1, heads)
               if heads % hc == 0 and all(hc * w % LANES == 0 for w in widths)), heads)


def auto_block(t: int, vmem_bytes=lambda b: 0) -> int:
  """Largest block of BLOCKS that pads T no further than 128-alignment does and whose kernels fit
  VMEM_BUDGET (vmem_bytes(block)); 128 at the least."""
  t128 = -(-t // LANES) * LANES
  return next(b for b in BLOCKS
              if (-(-t // b) * b == t128 and vmem_bytes(b) <= VMEM_BUDGET) or b == LANES)


def blocks(t: int, block_q, block_k, auto):
  """(bq, bk, tp): the query and key blocks (given, else auto()) and T padded to both. ValueError for a
  block that is not a positive multiple of 128."""
  bq = auto() if block_q is None else int(block_q)
  bk = auto() if block_k is None else int(block_k)
  for name, b in (("block_q", bq), ("block_k", bk)):
    if b < 1 or b % LANES:
      raise ValueError(f"{name} must be a positive multiple of {LANES}, got {b}")
  lcm = bq * bk // math.gcd(bq, bk)
  return bq, bk, -(-t // lcm) * lcm
