"""The static plan of one relation_kernel.kl_rows call: its shapes and blocks (the largest VMEM holds),
the token-major layout the kernels read, and what each kernel costs (its CostEstimate, for XLA's cost
model), apart from the kernels themselves (relation_kernel.py)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from minilm_jax import kernel_blocks

_LANES = kernel_blocks.LANES
# The loss is fp32 (config.precision: "the loss stays fp32"); a logit of size 10 from bf16-rounded
# inputs is off by ~0.04, which moves the softmax visibly. fp32 inputs therefore take fp32 matmuls (6 bf16
# MXU passes each). bf16 inputs (a bf16 run's Q, K, V) need no rounding: a bf16 × bf16 product is exact in
# the fp32 accumulator, so their logits take one pass, and the gradient matmuls split the fp32 dz into
# three bf16 parts (dz·x to fp32 accuracy in 3 passes). The 1/√d scale is applied to the fp32 logits
# (`scale`), not to the inputs, where it would round them.
PRECISION = jax.lax.Precision.HIGHEST


class Plan(NamedTuple):
  """Static shapes of one kl_rows call (hashable: the custom VJP's non-differentiable argument)."""
  batch: int
  heads: int   # C
  tp: int      # T padded to a multiple of the blocks
  dt: int      # teacher head width, padded to divide 128 (or to a multiple of 128)
  ds: int      # student head width, likewise
  hc: int      # heads per grid step
  bq: int
  bk: int
  interpret: bool
  dtype: str = "float32"  # of the inputs: "bfloat16" (all four) or "float32"
  scale_t: float = 1.0    # teacher logits = scale_t · (a · b)
  scale_s: float = 1.0
  teacher_grads: bool = True  # False: the backward computes the student's gradients only

  @property
  def bf16(self):
    return self.dtype == "bfloat16"

  @property
  def groups(self):
    return self.heads // self.hc

  @property
  def nq(self):
    return self.tp // self.bq

  @property
  def nk(self):
    return self.tp // self.bk

  @property
  def win_t(self):
    return window_width(self.dt, self.hc)

  @property
  def win_s(self):
    return window_width(self.ds, self.hc)

  @property
  def vmem_bytes(self):
    return vmem_bytes(self.bq, self.bk, self.hc * self.dt, self.hc * self.ds, self.win_t, self.win_s)




def window_width(width, hc):
  """Lanes each head's matmuls contract over: its own whole tiles, else the 128-lane window holding it
  (the whole step's lanes when they are fewer)."""
  return width if width >= _LANES else min(_LANES, hc * width)


def vmem_bytes(bq, bk, wt, ws, win_t, win_s):
  """VMEM of the largest of the three kernels, from above: double-buffered input blocks, the gradient
  accumulator and its double-buffered output, ~8 fp32 [bk, bq] temporaries and the gradient matmuls'
  results. Fitted to Mosaic's own figures for v5e (11.8 MiB measured for 15.3 estimated at 512, 16 + 8
  lane heads; 22.2 for 25.8 with 64 + 8)."""
  w, b = wt + ws, max(bq, bk)
  return 8 * (bq + bk) * w + 12 * b * w + 32 * bq * bk + 16 * b * (win_t + win_s)


def make_plan(batch, heads, t, d, e, block_q, block_k, interpret, dtype="float32", scale=(1.0, 1.0),
              teacher_grads=True):
  """The Plan of kl_rows on [batch, heads, t, d] teacher and [.., e] student heads; block_q / block_k
  None: the largest blocks VMEM holds (kernel_blocks.auto_block)."""
  dt, ds = kernel_blocks.lane_width(d), kernel_blocks.lane_width(e)
  hc = kernel_blocks.heads_per_step(heads, dt, ds)
  vmem = lambda b: vmem_bytes(b, b, hc * dt, hc * ds, window_width(dt, hc), window_width(ds, hc))
  bq, bk, tp = kernel_blocks.blocks(t, block_q, block_k, lambda: kernel_blocks.auto_block(t, vmem))
  return Plan(batch, heads, tp, dt, ds, hc, bq, bk, bool(interpret), jnp.dtype(dtype).name,
              float(scale[0]), float(scale[1]), bool(teacher_grads))


def one_block(plan):
  """Whether one grid step holds every query and key, so that one kernel gives all the gradients
  (relation_kernel's one-block kernels)."""
  return plan.nq == 1 and plan.nk == 1


# ---- the layout the kernels read


def token_major(x_BCTd, plan, width):
  """[B, C, T, d] -> [B, Tp, C·width]: zero lanes pad each head, zero rows pad T."""
  b, c, t, d = x_BCTd.shape
  x_BCTw = jnp.pad(x_BCTd, ((0, 0), (0, 0), (0, plan.tp - t), (0, width - d)))
  return jnp.swapaxes(x_BCTw, 1, 2).reshape(b, plan.tp, c * width)


def key_info(mask_BT, seg_BT, plan):
  """[B, 2, Tp] int32 rows (visible, segment id) of the keys; padding keys are invisible."""
  pad = ((0, 0), (0, plan.tp - mask_BT.shape[1]))
  return jnp.stack([jnp.pad(mask_BT.astype(jnp.int32), pad), jnp.pad(seg_BT.astype(jnp.int32), pad)], 1)


# ---- what the kernels cost


def cost(plan, kind, n_out=1):
  """CostEstimate of one kernel: "forward", "dq", "dk", or a one-block plan's "both" (all four gradients)
  and "value_and_grad". Flops count the MXU work issued (each head contracts over its whole lane window:
  128 lanes for d < 128; in the bf16 passes each matmul takes) and the elementwise work per (query, key)
  pair; bytes count every block DMA'd: the outer side's blocks once, the inner side's once per outer
  block (once in all when there is a single inner block, as Pallas skips an unchanged block)."""
  b, c, tp = plan.batch, plan.heads, plan.tp
  pairs, rows = b * c * tp * tp, b * c * tp
  # Logits of both models, per pair: a 16-lane relation head still fills the MXU's 128-deep contraction.
  # Passes: bf16 inputs 1 for the logits, 3 for the gradient matmuls; fp32 6 for each (PRECISION).
  lanes = 2 * (plan.win_t + plan.win_s)
  fp32 = kernel_blocks.mxu_passes(PRECISION)
  mxu = lanes if plan.bf16 else fp32 * lanes
  grad_lanes = 2 * ((plan.win_t if plan.teacher_grads else 0) + plan.win_s)
  grad_mxu = (3 if plan.bf16 else fp32) * grad_lanes
  side = b * tp * c * (plan.dt + plan.ds) * (2 if plan.bf16 else 4)  # one side (a or b) of both models
  kinfo, qseg = plan.groups * b * 2 * tp * 4, plan.groups * b * tp * 4
  outer, inner = (plan.nk, plan.nq) if kind == "dk" else (plan.nq, plan.nk)
  reps = outer if inner > 1 else 1
  if kind == "forward":
    return pl.CostEstimate(
        flops=pairs * (mxu + 12) + rows * plan.nk * 8,
        transcendentals=2 * pairs + rows * (2 * plan.nk + 2),
        bytes_accessed=side + side * reps + reps * kinfo + qseg + n_out * rows * 4)
  written = b * tp * c * ((plan.dt if plan.teacher_grads else 0) + plan.ds) * 4  # fp32 gradients
  # g, lse_t, lse_s, c are per query row: read with the query blocks.
  rows_in = 4 * rows * 4
  if kind == "both":  # one grid step per (b, group): every block read once, the logits computed once
    return pl.CostEstimate(flops=pairs * (mxu + 2 * grad_mxu + 16), transcendentals=2 * pairs,
                           bytes_accessed=2 * side + rows_in + kinfo + qseg + 2 * written)
  if kind == "value_and_grad":  # the same, with the forward's row statistics; w in, kl out
    return pl.CostEstimate(flops=pairs * (mxu + 2 * grad_mxu + 28) + rows * 8,
                           transcendentals=2 * pairs + 2 * rows,
                           bytes_accessed=2 * side + 2 * rows * 4 + kinfo + qseg + 2 * written)
  if kind == "dq":
    inputs = side + rows_in + reps * (side + kinfo) + qseg
  else:
    inputs = side + kinfo + reps * (side + rows_in + qseg)
  return pl.CostEstimate(flops=pairs * (mxu + grad_mxu + 16), transcendentals=2 * pairs,
                         bytes_accessed=inputs + written)
