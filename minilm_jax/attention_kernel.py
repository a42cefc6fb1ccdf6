"""BERT self-attention with dropout on the probabilities as Pallas TPU flash-attention kernels: no
[B, H, T, T] array (scores, probabilities, dropout mask, or their gradients) ever reaches HBM.

attention(q, k, v, mask, num_heads, rate=, seeds_B=) gives model.attention(q, k, v, mask, num_heads,
dropout) with the mask dropout_hash.keep_mask(seeds_B, num_heads, T, rate): 16 bits of a counter-based hash
of (seeds_B[b], h, t, s) (two rounds of murmur3's fmix32 on int32, one 32-bit hash for two heads), which
the kernels compute block by block on the vector units, so the backward pass regenerates the forward's
mask and no mask exists in HBM. The counter t·T + s is unique for T < 65536.

Forward: one kernel, grid (b, head group, query block, key block), an online softmax over key blocks
with queries on sublanes (scores s[t, s]); saves the output and lse per query row. Backward (custom
VJP): one kernel, grid (b, head group, key block, query block), that recomputes the scores transposed,
sT[s, t] (keys on sublanes, queries on lanes), so that lse and D_t = rowsum(dO ∘ O) broadcast as
lane-dense rows [1, bq]; dK, dV accumulate over the query blocks in VMEM, and dQ of the whole sequence
of one (b, head group) stays in VMEM too ([Tp, W] fp32: 1 MiB at T = 2048), so each score block is
recomputed once, not once for dQ and again for dK, dV.

Local window (window=w: query t attends keys |t − s| ≤ w, modernbert.attention's local layers): the
inner grid axis becomes a band, the most blocks one outer block's reach meets (key blocks within
[i·bq − w, (i+1)·bq − 1 + w] of query block i; the query blocks reaching key block j), starting at the
reach's first block, so block pairs out of reach have no grid step at all. The band's edge steps past
a shorter reach skip the work (pl.when) and their index maps repeat a block already in VMEM (no DMA);
the row state still starts on a band's first step and ends on its last, and the backward starts and
finishes each query block's dq (and D) at the first and last key block it meets. An element mask
within the blocks does the rest; the CostEstimates count only the block pairs in reach.

Layout (as relation_kernel.py's). The kernels read the model's token-major [B, T, H·d] layout directly:
a grid step holds `hc` heads of one batch row, the fewest whose lanes fill whole 128-lane tiles (4 heads
of 32, 2 of 64), so no transpose to heads-major is needed and no [T, 32] block pads 4x in VMEM. Head h's
matmuls contract over the step's W = hc·d lanes with the other heads' lanes zeroed on one side (a
32-deep contraction costs the 128-deep MXU as much as a 128-deep one); its P·V product then lands in
head h's lanes only, so the heads' contexts and gradients add up in one [rows, W] accumulator.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from minilm_jax import attention_plan, dropout_hash, kernel_blocks


# Masked scores: a batch row without any real key attends all keys uniformly (finite, as
# model.attention's).
MASK_VALUE = kernel_blocks.MASK_VALUE
_LANES = kernel_blocks.LANES
# ------------------------------------------------------------------------------------------- layout


def _pack(x_BTD, plan):
  """[B, T, H·dh] -> [B, Tp, H·dw]: zero rows pad T, zero lanes pad each head (no copy if neither)."""
  b, t, _ = x_BTD.shape
  if plan.dw != plan.dh:
    x_BTHd = jnp.pad(x_BTD.reshape(b, t, plan.heads, plan.dh), ((0, 0),) * 3 + ((0, plan.dw - plan.dh),))
    x_BTD = x_BTHd.reshape(b, t, plan.heads * plan.dw)
  if plan.tp != t:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, plan.tp - t), (0, 0)))
  return x_BTD


def _unpack(x_BTD, plan):
  """_pack's inverse: [B, Tp, H·dw] -> [B, T, H·dh]."""
  b = x_BTD.shape[0]
  x_BTD = x_BTD[:, :plan.t]
  if plan.dw != plan.dh:
    x_BTD = x_BTD.reshape(b, plan.t, plan.heads, plan.dw)[..., :plan.dh].reshape(b, plan.t, -1)
  return x_BTD


# ------------------------------------------------------------------------------------- kernel parts


def _dot(x, y, contract, plan):
  return jax.lax.dot_general(x, y, (contract, ((), ())), precision=plan.precision,
                             preferred_element_type=jnp.float32)


def _head_lanes(plan, h):
  """[1, W] bool: the lanes of the step's head h (static)."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, plan.width), 1)
  return (lane >= h * plan.dw) & (lane < (h + 1) * plan.dw)


def _only(x, in_head, plan):
  """x [rows, W] with the other heads' lanes zeroed (as is with one head a step)."""
  return x if plan.hc == 1 else jnp.where(in_head, x, jnp.zeros((), x.dtype))


def _step_bits(seeds_ref, counter, plan, b, g):
  """16 dropout bits of each of the step's hc heads at `counter` (b, g: the step's program ids, read
  outside any pl.when, where interpret mode has none): a function of h, traced lazily so that an even
  head's pair hash serves the odd head after it."""
  seed = seeds_ref[b]
  cache = {}

  def bits(h):
    if plan.hc % 2 == 0:  # pairs lie within the step: static pair and half
      if h // 2 not in cache:
        cache[h // 2] = dropout_hash.pair_bits(seed, g * (plan.hc // 2) + h // 2, counter)
      return dropout_hash.half16(cache[h // 2], h % 2)
    head = g * plan.hc + h  # one head a step, or an odd number of heads in one step
    pair = jax.lax.shift_right_logical(head, 1)
    return dropout_hash.half16(dropout_hash.pair_bits(seed, pair, counter), head & 1)

  return bits


def _counter(shape, queries_axis, t0, s0, plan):
  """int32 t·T + s of a block starting at query t0 and key s0, queries along `queries_axis` (0: a
  [bq, bk] block, 1: a transposed [bk, bq] one)."""
  t_pos = jax.lax.broadcasted_iota(jnp.int32, shape, queries_axis)
  s_pos = jax.lax.broadcasted_iota(jnp.int32, shape, 1 - queries_axis)
  return t_pos * plan.t + s_pos + (t0 * plan.t + s0)


# ------------------------------------------------------------------------------------------ kernels


def _window_mask(shape, queries_axis, i, j, plan):
  """[bq, bk] (queries_axis 0) or [bk, bq] (1) bool: |t − s| ≤ window within query block i, key block j;
  None without a window."""
  if plan.window is None:
    return None
  diff = (jax.lax.broadcasted_iota(jnp.int32, shape, queries_axis)
          - jax.lax.broadcasted_iota(jnp.int32, shape, 1 - queries_axis) + (i * plan.bq - j * plan.bk))
  return (diff <= plan.window) & (diff >= -plan.window)


def _when_meets(lo_hi, x, plan, body):
  """body() where inner block x lies in lo_hi, the outer block's reach: the band's edge steps skip the
  work (their index maps repeat a neighbour's block, so they copy nothing either)."""
  if plan.window is None:
    body()
  else:
    pl.when((x >= lo_hi[0]) & (x <= lo_hi[1]))(body)


def _forward_kernel(seeds_ref, kvalid_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr,
                    *, plan):
  """Grid (b, group, query block i, band step): online softmax over the key blocks j of the band, those
  from band_start(i) (all without a window). m_scr, l_scr [bq, 128] hold head h's running max and sum in
  lane h; acc_scr [bq, W] the unnormalised context."""
  b, g, i, step = (pl.program_id(a) for a in range(4))
  j = plan.band_start(i, False) + step

  # On the band's first and last steps whether or not they do work: the row's state must start and end.
  @pl.when(step == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def _accumulate():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    allowed_QK = kvalid_ref[...] != 0  # [1, bk]: broadcast along the queries
    in_window = _window_mask((plan.bq, plan.bk), 0, i, j, plan)
    if in_window is not None:
      allowed_QK = allowed_QK & in_window
    if plan.threshold:
      counter = _counter((plan.bq, plan.bk), 0, i * plan.bq, j * plan.bk, plan)
      bits = _step_bits(seeds_ref, counter, plan, b, g)
    alpha_QW = jnp.ones((plan.bq, plan.width), jnp.float32)
    pv_QW = jnp.zeros((plan.bq, plan.width), jnp.float32)
    for h in range(plan.hc):  # unrolled: hc is 1 to 4 for heads of 32 lanes and wider
      in_head = _head_lanes(plan, h)
      s_QK = _dot(_only(q, in_head, plan), k, ((1,), (1,)), plan) * plan.scale
      s_QK = jnp.where(allowed_QK, s_QK, MASK_VALUE)
      m_old, l_old = m_scr[:, h:h + 1], l_scr[:, h:h + 1]
      m_new = jnp.maximum(m_old, s_QK.max(1, keepdims=True))
      p_QK = jnp.exp(s_QK - m_new)
      alpha = jnp.exp(m_old - m_new)
      # The normaliser sums the undropped probabilities: dropout acts on the normalised ones.
      l_scr[:, h:h + 1] = alpha * l_old + p_QK.sum(1, keepdims=True)
      m_scr[:, h:h + 1] = m_new
      if plan.threshold:
        p_QK = jnp.where(bits(h) >= plan.threshold, p_QK, 0.0)
      pv_QW += _dot(p_QK.astype(v.dtype), _only(v, in_head, plan), ((1,), (0,)), plan)
      alpha_QW = jnp.where(in_head, alpha, alpha_QW)
    acc_scr[...] = acc_scr[...] * alpha_QW + pv_QW

  _when_meets(plan.reach(i, False), j, plan, _accumulate)

  @pl.when(step == plan.kband - 1)
  def _finish():
    l_Q128 = l_scr[...]
    inv_QW = jnp.zeros((plan.bq, plan.width), jnp.float32)
    for h in range(plan.hc):
      inv_QW = jnp.where(_head_lanes(plan, h), plan.inv_keep / l_Q128[:, h:h + 1], inv_QW)
    o_ref[...] = (acc_scr[...] * inv_QW).astype(o_ref.dtype)
    # Lane h's lse to row h: an aligned [bq, 128] transpose, once per query block.
    lane = jax.lax.broadcasted_iota(jnp.int32, l_Q128.shape, 1)
    lse_Q128 = jnp.where(lane < plan.hc, m_scr[...] + jnp.log(jnp.maximum(l_Q128, 1e-30)), 0.0)
    lse_ref[...] = lse_Q128.T[:plan.hc]


def _row_sums(x_QW, plan):
  """Σ over each head's lanes of x [bq, W], as lane-dense rows [hc8, bq] (hc padded to 8 sublanes): an
  NT matmul with a 0/1 head selector, which needs no [bq, hc] -> [hc, bq] transpose."""
  hc8 = -(-plan.hc // 8) * 8
  row = jax.lax.broadcasted_iota(jnp.int32, (hc8, plan.width), 0)
  lane = jax.lax.broadcasted_iota(jnp.int32, (hc8, plan.width), 1)
  select_HW = ((lane >= row * plan.dw) & (lane < (row + 1) * plan.dw)).astype(jnp.float32)
  return jax.lax.dot_general(select_HW, x_QW, (((1,), (1,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _backward_kernel(seeds_ref, kvalid_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref,
                     dq_ref, dk_ref, dv_ref, dq_scr, dk_scr, dv_scr, di_scr, *, plan):
  """Grid (b, group, key block j, band step), transposed blocks [bk, bq] of the query blocks i of j's
  band, those from band_start(j) (all without a window). dk_scr, dv_scr [bk, W] sum over the query
  blocks; dq_scr [Tp, W] holds the (b, group)'s whole dq, summed over key blocks; di_scr [nq, hc8, bq]
  the rows D_t = rowsum(dO_t ∘ O_t) of each head, computed at the first key block that query block i
  meets (the only step that reads its O: O's block index stays put otherwise)."""
  b, g, j, step = (pl.program_id(a) for a in range(4))
  i = plan.band_start(j, True) + step
  rows = pl.ds(pl.multiple_of(i * plan.bq, plan.bq), plan.bq)
  # The key blocks that query block i meets: its dq starts at the first, is complete at the last.
  first_j, last_j = plan.reach(i, False)

  @pl.when(step == 0)
  def _init_kv():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(j == first_j)
  def _init_q():
    dq_scr[rows, :] = jnp.zeros((plan.bq, plan.width), jnp.float32)
    # With dropout D = rowsum(P ∘ dP̃) = dO · Σ_s (P ∘ M/keep)_s v_s = dO · O, O the dropped output.
    di_scr[i] = _row_sums(do_ref[...].astype(jnp.float32) * o_ref[...].astype(jnp.float32), plan)

  def _accumulate():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    if plan.threshold:
      # dP̃ = (dO Vᵀ) ∘ M/keep and dV = (P ∘ M/keep)ᵀ dO both take dO/keep: scaled once a block.
      do = (do.astype(jnp.float32) * plan.inv_keep).astype(do.dtype)
    di_HQ = di_scr[i]
    allowed_KQ = (kvalid_ref[...] != 0).T  # the key row becomes a column, to broadcast along queries
    in_window = _window_mask((plan.bk, plan.bq), 1, i, j, plan)
    if in_window is not None:
      allowed_KQ = allowed_KQ & in_window
    if plan.threshold:
      counter = _counter((plan.bk, plan.bq), 1, i * plan.bq, j * plan.bk, plan)
      bits = _step_bits(seeds_ref, counter, plan, b, g)
    dk_KW = jnp.zeros((plan.bk, plan.width), jnp.float32)
    dv_KW = jnp.zeros((plan.bk, plan.width), jnp.float32)
    dq_QW = jnp.zeros((plan.bq, plan.width), jnp.float32)
    for h in range(plan.hc):
      in_head = _head_lanes(plan, h)
      k_h, do_h = _only(k, in_head, plan), _only(do, in_head, plan)
      s_KQ = jnp.where(allowed_KQ, _dot(k_h, q, ((1,), (1,)), plan) * plan.scale, MASK_VALUE)
      p_KQ = jnp.exp(s_KQ - lse_ref[h:h + 1, :])
      dp_KQ = _dot(v, do_h, ((1,), (1,)), plan)  # (dO Vᵀ)ᵀ / keep
      if plan.threshold:
        kept = bits(h) >= plan.threshold
        pd_KQ, dp_KQ = jnp.where(kept, p_KQ, 0.0), jnp.where(kept, dp_KQ, 0.0)
      else:
        pd_KQ = p_KQ
      dv_KW += _dot(pd_KQ.astype(do.dtype), do_h, ((1,), (0,)), plan)
      ds_KQ = (p_KQ * (dp_KQ - di_HQ[h:h + 1, :])).astype(q.dtype)
      dk_KW += _dot(ds_KQ, _only(q, in_head, plan), ((1,), (0,)), plan)
      dq_QW += _dot(ds_KQ, k_h, ((0,), (0,)), plan)
    dk_scr[...] += dk_KW
    dv_scr[...] += dv_KW
    dq_scr[rows, :] += dq_QW

  _when_meets(plan.reach(j, True), i, plan, _accumulate)

  @pl.when(step == plan.qband - 1)
  def _finish_kv():
    dk_ref[...] = (dk_scr[...] * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)

  @pl.when(j == last_j)
  def _finish_q():
    dq_ref[rows, :] = (dq_scr[rows, :] * plan.scale).astype(dq_ref.dtype)


# ------------------------------------------------------------------------------------- pallas_call


def _params(plan, semantics):
  # Blocks chosen by hand may need more than the budget: ask for it (a v4 then fails to compile rather
  # than spill).
  need = attention_plan.vmem_bytes(plan.bq, plan.bk, plan.tp, plan.width, plan.itemsize)
  limit = max(kernel_blocks.VMEM_BUDGET, need * 5 // 4)
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _grid_spec(plan, in_specs, out_specs, scratch, keys_outer):
  """Grid (b, group, outer block, band step) with the seeds in SMEM (scalar prefetch: index maps get its
  ref)."""
  inner = (plan.nk, plan.qband) if keys_outer else (plan.nq, plan.kband)
  return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(plan.batch, plan.groups) + inner,
                                      in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch)


def _specs(plan, keys_outer):
  """BlockSpecs (kvalid, q-side [bq, W], k-side [bk, W], rows [hc, bq]) of grid (b, g, outer, step)."""

  def blocks(x, step):  # -> (query block i, key block j)
    inner = attention_plan.inner_block(plan, keys_outer, x, step)
    return (inner, x) if keys_outer else (x, inner)

  def spec(shape, index):
    return pl.BlockSpec(shape, lambda b, g, x, step, *_: index(b, g, *blocks(x, step)))

  return dict(
      kvalid=spec((None, 1, plan.bk), lambda b, g, i, j: (b, 0, j)),
      q=spec((None, plan.bq, plan.width), lambda b, g, i, j: (b, i, g)),
      k=spec((None, plan.bk, plan.width), lambda b, g, i, j: (b, j, g)),
      rows=spec((None, None, plan.hc, plan.bq), lambda b, g, i, j: (b, g, 0, i)),
  )


def _rows_shape(plan):
  return jax.ShapeDtypeStruct((plan.batch, plan.groups, plan.hc, plan.tp), jnp.float32)


def _forward_call(plan, seeds, kvalid, q, k, v):
  """o [B, Tp, H·dw] and lse [B, G, hc, Tp]."""
  s = _specs(plan, keys_outer=False)
  stats = pltpu.VMEM((plan.bq, _LANES), jnp.float32)
  return pl.pallas_call(
      functools.partial(_forward_kernel, plan=plan),
      grid_spec=_grid_spec(plan, [s["kvalid"], s["q"], s["k"], s["k"]], [s["q"], s["rows"]],
                           [stats, stats, pltpu.VMEM((plan.bq, plan.width), jnp.float32)], False),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), _rows_shape(plan)],
      compiler_params=_params(plan, ("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=attention_plan.cost(plan, "forward"),
      interpret=plan.interpret,
      name="attention_dropout_forward",
  )(seeds, kvalid, q, k, v)


def _backward_call(plan, seeds, kvalid, q, k, v, o, do, lse):
  """dq, dk, dv [B, Tp, H·dw]."""
  s = _specs(plan, keys_outer=True)
  # O is read once per query block (for D); otherwise its block index stays put.
  o_spec = pl.BlockSpec((None, plan.bq, plan.width),
                        lambda b, g, j, step, *_: (b, attention_plan.o_block(plan, j, step), g))
  whole_q = pl.BlockSpec((None, plan.tp, plan.width), lambda b, g, j, i, *_: (b, 0, g))
  acc = lambda n: pltpu.VMEM((n, plan.width), jnp.float32)
  di = pltpu.VMEM((plan.nq, -(-plan.hc // 8) * 8, plan.bq), jnp.float32)
  return pl.pallas_call(
      functools.partial(_backward_kernel, plan=plan),
      # The inner two axes carry accumulators (dq over key blocks, dk and dv over query blocks).
      grid_spec=_grid_spec(plan, [s["kvalid"], s["q"], s["k"], s["k"], o_spec, s["q"], s["rows"]],
                           [whole_q, s["k"], s["k"]], [acc(plan.tp), acc(plan.bk), acc(plan.bk), di],
                           True),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] * 3,
      compiler_params=_params(plan, ("parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=attention_plan.cost(plan, "backward"),
      interpret=plan.interpret,
      name="attention_dropout_backward",
  )(seeds, kvalid, q, k, v, o, do, lse)


# --------------------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, kvalid, seeds, plan):
  """Context [B, Tp, H·dw] of packed inputs (_pack)."""
  return _forward_call(plan, seeds, kvalid, q, k, v)[0]


def _attend_fwd(q, k, v, kvalid, seeds, plan):
  o, lse = _forward_call(plan, seeds, kvalid, q, k, v)
  return o, (q, k, v, kvalid, seeds, o, lse)


def _attend_bwd(plan, res, do):
  q, k, v, kvalid, seeds, o, lse = res
  dq, dk, dv = _backward_call(plan, seeds, kvalid, q, k, v, o, do, lse)
  return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# ------------------------------------------------------------------------------------------- public


def attention(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, *, window: Optional[int] = None, rate=0.0,
              seeds_B=None, block_q=None, block_k=None, interpret=False):
  """model.attention(q, k, v, mask, num_heads, dropout) from Pallas TPU kernels (with `window`:
  modernbert.attention(q, k, v, mask, num_heads, window, ...)): context [B, T, D] in q's dtype.

  q, k, v: [B, T, D], bf16 or fp32 (k, v are cast to q's dtype), heads contiguous slices of D; mask_BT:
  keys with mask == 0 are excluded. window: None, all keys; an int w ≥ 0, query t attends only keys s
  with |t − s| ≤ w (a query without a real key within reach stays finite, as a row without any real key
  does, though its values are not the reference's); the grids then visit only the block pairs within
  reach. rate: dropout on the normalised probabilities, ctx = (P ∘ M / keep) V with
  M = dropout_hash.keep_mask(seeds_B, num_heads, T, rate), keep = 1 − rate (exact to 1/65536);
  seeds_B: uint32 [B], one seed per batch row (None, or rate 0: no dropout). block_q, block_k:
  multiples of 128 (default: up to 512 as VMEM allows; with a window, the size of least work and step
  overhead: attention_plan.window_block); T is padded to a multiple of both with masked keys.
  interpret: Pallas interpret mode (any backend). Differentiable in q, k, v (custom VJP saving the output
  and lse).
  Per device: under several devices, call it inside shard_map.
  """
  b, t, d = q_BTD.shape
  if k_BTD.shape != q_BTD.shape or v_BTD.shape != q_BTD.shape:
    raise ValueError(f"attention needs q, k, v of one shape [B, T, D], got {q_BTD.shape}, {k_BTD.shape}, "
                     f"{v_BTD.shape}")
  if d % num_heads:
    raise ValueError(f"D = {d} is not a multiple of num_heads = {num_heads}")
  if mask_BT.shape != (b, t):
    raise ValueError(f"mask must be [B, T] = {(b, t)}, got {mask_BT.shape}")
  dtype = jnp.dtype(q_BTD.dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"attention takes bf16 or fp32 inputs, got {dtype}")
  threshold = dropout_hash.threshold(rate) if seeds_B is not None else 0
  if seeds_B is not None and jnp.shape(seeds_B) != (b,):
    raise ValueError(f"seeds_B must be [B] = {(b,)}, got {jnp.shape(seeds_B)}")
  plan = attention_plan.make_plan(b, num_heads, t, d // num_heads, dtype, block_q, block_k, threshold,
                                 interpret, window)
  kvalid_B1T = jnp.pad((mask_BT > 0).astype(jnp.int32), ((0, 0), (0, plan.tp - t)))[:, None, :]
  if threshold:
    seeds_B = jax.lax.bitcast_convert_type(jnp.asarray(seeds_B, jnp.uint32), jnp.int32)
  else:
    seeds_B = jnp.zeros((b,), jnp.int32)
  pack = lambda x: _pack(x.astype(dtype), plan)
  return _unpack(_attend(pack(q_BTD), pack(k_BTD), pack(v_BTD), kvalid_B1T, seeds_B, plan), plan)
