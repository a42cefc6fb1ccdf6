"""The MiniLM relation KL (losses.py's module docstring) as Pallas TPU kernels that never write a
[B, C, T, T] tensor to HBM.

kl_rows(ta, tb, sa, sb, mask, seg) gives KL_t [B, C, T] for every query row of every head: the numbers
losses.blockwise_kl_rows gives, from the same heads-major, pre-scaled fp32 inputs. Forward: one kernel,
an online log-sum-exp over key blocks (as flash attention does) that keeps per-row statistics in VMEM.
Backward (custom VJP): from the per-row residuals lse_T, lse_S, c alone, two kernels that recompute the
logits block by block: one over query blocks for d_ta, d_sa, one over key blocks for d_tb, d_sb. When
one block holds every query and key (T ≤ 512, the recipes' lengths), one kernel gives all four from
logits computed once (_grad_one_block_kernel); and the loss's weighted sums (kl_rows with weights, what
losses.py takes) get their value and gradients from a single kernel (_value_and_grad_kernel): each
head's logits are computed once per step, not three times.

Layout. The kernels read the token-major [B, T, C·d] layout the model produces (the wrapper undoes the
heads-major transpose; inside a caller's jit the two transposes cancel): a [T, 16] head block would fill
16 of a vreg's 128 lanes and pad 8x in HBM and VMEM. A grid step holds `hc` heads (hc·d and hc·e lanes,
whole multiples of 128) of one batch row, one query block and one key block. Head h is read as the
128-lane window that contains it with the other heads' lanes zeroed, so every matmul contracts over an
aligned 128 lanes (the MXU's depth; a 16-wide contraction costs it the same). Logits are computed
transposed, z[s, t] with keys on sublanes and queries on lanes, so the reductions over keys give the
per-row statistics as lane-dense rows [1, bq], stored as [hc, bq] tiles.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from minilm_jax import kernel_blocks, relation_plan


MASK_VALUE = kernel_blocks.MASK_VALUE
_LANES = kernel_blocks.LANES
_PRECISION = relation_plan.PRECISION


# ----------------------------------------------------------------------------------- kernel parts


def _window(ref, h, width, zero_others):
  """Head h (traced) of a [rows, W] block: the lane window that holds it [rows, win], aligned to 128
  lanes (or the whole block when narrower), with the other heads' lanes zeroed if asked; and the
  window's lanes (a pl.ds) to accumulate its gradient into."""
  win = relation_plan.window_width(width, ref.shape[-1] // width)
  if width >= _LANES:  # whole tiles of its own
    start = pl.multiple_of(h * width, _LANES)
  elif win < _LANES:  # one narrow block holds every head
    start = 0
  else:
    # lax.div, not //: Pallas lowers floor division through sign(), whose rule asks the local device
    # for its TPU generation, so it fails when compiling for a TPU from a CPU host.
    start = pl.multiple_of(jax.lax.div(h * width, _LANES) * _LANES, _LANES)
  lanes = pl.ds(start, win)
  x = ref[:, lanes]
  if zero_others and win > width:
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, win), 1)
    lo = h * width - start
    x = jnp.where((lane >= lo) & (lane < lo + width), x, 0.0)
  return x, lanes


def _for_heads(plan, body):
  """body(h) for the hc heads of the grid step: a loop, not unrolled, so that Mosaic compiles one copy
  of the [bk, bq] work (16 unrolled heads took 38 s to compile at 512 x 512 blocks)."""
  def step(h, carry):
    body(h)
    return carry
  jax.lax.fori_loop(0, plan.hc, step, 0)


def _dot(x, y, contract):
  """x·y in fp32: one pass when both are bf16 (exact products), else fp32 matmuls (_PRECISION)."""
  bf16 = x.dtype == y.dtype == jnp.bfloat16
  return jax.lax.dot_general(x, y, (contract, ((), ())), preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.DEFAULT if bf16 else _PRECISION)


def _grad_dot(dz, x, contract):
  """dz·x in fp32 for fp32 dz: with bf16 x, dz split into three bf16 parts (hi + mid + lo carry its 24
  bits), each product exact, so three passes give what the fp32 matmul's six do."""
  if x.dtype != jnp.bfloat16:
    return _dot(dz, x, contract)
  parts = []
  for _ in range(3):
    parts.append(dz.astype(jnp.bfloat16))
    dz = dz - parts[-1].astype(jnp.float32)
  return _dot(parts[0], x, contract) + (_dot(parts[1], x, contract) + _dot(parts[2], x, contract))


def _logits_KQ(k_Kw, q_Qw, valid_KQ, scale):
  """Masked logits z[s, t] = scale · k_s · q_t [bk, bq]: keys on sublanes, queries on lanes."""
  z = _dot(k_Kw, q_Qw, ((1,), (1,)))
  return jnp.where(valid_KQ, z if scale == 1.0 else z * scale, MASK_VALUE)


def _validity_KQ(kinfo_ref, qseg_ref):
  """[bk, bq] bool: key s visible from query t (key visible and the same segment)."""
  info_K2 = kinfo_ref[...].T  # the key rows become columns, to broadcast along the query lanes
  return (info_K2[:, 0:1] != 0) & (info_K2[:, 1:2] == qseg_ref[...])


def _dz(zt_KQ, zs_KQ, valid_KQ, g_1Q, lse_t_1Q, lse_s_1Q, c_1Q):
  """∂(g·KL)/∂z_T and ∂(g·KL)/∂z_S [bk, bq] (losses.py, above _key_blocks)."""
  # where(): a row with no visible key has lse ≈ MASK_VALUE, and exp(z − lse) = 1 on its masked keys.
  pt = jnp.where(valid_KQ, jnp.exp(zt_KQ - lse_t_1Q), 0.0)
  ps = jnp.where(valid_KQ, jnp.exp(zs_KQ - lse_s_1Q), 0.0)
  return _dz_of_probs(zt_KQ, zs_KQ, pt, ps, g_1Q, c_1Q)


def _dz_of_probs(zt_KQ, zs_KQ, pt_KQ, ps_KQ, g_1Q, c_1Q):
  """_dz from the two models' probabilities [bk, bq] (zero on invisible keys)."""
  return g_1Q * pt_KQ * ((zt_KQ - zs_KQ) - c_1Q), g_1Q * (ps_KQ - pt_KQ)


# ------------------------------------------------------------------------------------------ kernels


def _forward_kernel(kinfo_ref, qseg_ref, ta_ref, tb_ref, sa_ref, sb_ref, *refs, plan, residuals):
  """Grid (b, group, query block, key block): online log-sum-exp of both models over key blocks."""
  n_out = 4 if residuals else 1
  out_refs, (m_t, l_t, m_s, l_s, acc) = refs[:n_out], refs[n_out:]
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    for ref, v in ((m_t, MASK_VALUE), (l_t, 0.0), (m_s, MASK_VALUE), (l_s, 0.0), (acc, 0.0)):
      ref[...] = jnp.full(ref.shape, v, jnp.float32)

  valid_KQ = _validity_KQ(kinfo_ref, qseg_ref)

  def head(h):
    row = pl.ds(h, 1)
    zt = _logits_KQ(_window(tb_ref, h, plan.dt, False)[0], _window(ta_ref, h, plan.dt, True)[0], valid_KQ,
                    plan.scale_t)
    zs = _logits_KQ(_window(sb_ref, h, plan.ds, False)[0], _window(sa_ref, h, plan.ds, True)[0], valid_KQ,
                    plan.scale_s)
    mt_old, ms_old = m_t[row, :], m_s[row, :]
    mt_new = jnp.maximum(mt_old, zt.max(0, keepdims=True))
    ms_new = jnp.maximum(ms_old, zs.max(0, keepdims=True))
    et = jnp.exp(zt - mt_new)
    rescale_t = jnp.exp(mt_old - mt_new)
    l_t[row, :] = l_t[row, :] * rescale_t + et.sum(0, keepdims=True)
    # Masked keys hold MASK_VALUE in both logits, so zt − zs = 0 there: no where() needed.
    acc[row, :] = acc[row, :] * rescale_t + (et * (zt - zs)).sum(0, keepdims=True)
    l_s[row, :] = l_s[row, :] * jnp.exp(ms_old - ms_new) + jnp.exp(zs - ms_new).sum(0, keepdims=True)
    m_t[row, :] = mt_new
    m_s[row, :] = ms_new

  _for_heads(plan, head)

  @pl.when(j == plan.nk - 1)
  def _finish():
    lse_t = m_t[...] + jnp.log(l_t[...])
    lse_s = m_s[...] + jnp.log(l_s[...])
    c = acc[...] / l_t[...]
    out_refs[0][...] = c - lse_t + lse_s
    if residuals:
      out_refs[1][...], out_refs[2][...], out_refs[3][...] = lse_t, lse_s, c


def _grad_kernel(kinfo_ref, qseg_ref, ta_ref, tb_ref, sa_ref, sb_ref, g_ref, lse_t_ref, lse_s_ref, c_ref,
                 *refs, plan, keys_outer):
  """Gradients of one block, summed over the inner grid axis. keys_outer False: grid (b, group, query
  block, key block), gives d_ta, d_sa = dzᵀ k; True: grid (b, group, key block, query block), gives
  d_tb, d_sb = dz q (dz [bk, bq] keys × queries). refs: (d_t, d_s, acc_t, acc_s), or (d_s, acc_s)
  without the teacher's gradients."""
  if plan.teacher_grads:
    d_t_ref, d_s_ref, acc_t, acc_s = refs
  else:
    (d_s_ref, acc_s), d_t_ref, acc_t = refs, None, None
  inner = pl.program_id(3)

  @pl.when(inner == 0)
  def _init():
    for acc in (acc_t, acc_s)[0 if plan.teacher_grads else 1:]:
      acc[...] = jnp.zeros(acc.shape, jnp.float32)

  valid_KQ = _validity_KQ(kinfo_ref, qseg_ref)
  # The side that multiplies dz (the keys for d_ta, the queries for d_tb) has the other heads' lanes
  # zeroed: the logits are then head h's, and its gradient lands only in head h's lanes of the window.
  mult = (tb_ref, sb_ref) if not keys_outer else (ta_ref, sa_ref)
  other = (ta_ref, sa_ref) if not keys_outer else (tb_ref, sb_ref)
  contract = ((1,), (0,)) if keys_outer else ((0,), (0,))

  def head(h):
    row = pl.ds(h, 1)
    (xt, lanes_t), (xs, lanes_s) = _window(mult[0], h, plan.dt, True), _window(mult[1], h, plan.ds, True)
    yt, ys = _window(other[0], h, plan.dt, False)[0], _window(other[1], h, plan.ds, False)[0]
    k_t, q_t = (yt, xt) if keys_outer else (xt, yt)
    k_s, q_s = (ys, xs) if keys_outer else (xs, ys)
    zt, zs = _logits_KQ(k_t, q_t, valid_KQ, plan.scale_t), _logits_KQ(k_s, q_s, valid_KQ, plan.scale_s)
    dzt, dzs = _dz(zt, zs, valid_KQ, g_ref[row, :], lse_t_ref[row, :], lse_s_ref[row, :], c_ref[row, :])
    if plan.teacher_grads:
      acc_t[:, lanes_t] += _grad_dot(dzt, xt, contract)
    acc_s[:, lanes_s] += _grad_dot(dzs, xs, contract)

  _for_heads(plan, head)

  @pl.when(inner == pl.num_programs(3) - 1)
  def _finish():  # z = scale · (a · b): both sides' gradients carry the scale
    if plan.teacher_grads:
      d_t_ref[...] = acc_t[...] * plan.scale_t
    d_s_ref[...] = acc_s[...] * plan.scale_s


def _one_block_head(plan, h, ta_ref, tb_ref, sa_ref, sb_ref, valid_KQ, accs, dz_of):
  """Head h of a one-block grid step (every query and key in the block): its logits, computed once,
  give dz (dz_of(zt, zs) -> (dzt, dzs)) and from it both sides' gradients, d_a = dzᵀ b and d_b = dz a,
  added to `accs` (d_ta, d_tb, d_sa, d_sb accumulators, or d_sa, d_sb without the teacher's)."""
  # Both sides with the other heads' lanes zeroed: the logits are head h's, and each gradient lands
  # only in head h's lanes of its window.
  (at, la_t), (bt, lb_t) = _window(ta_ref, h, plan.dt, True), _window(tb_ref, h, plan.dt, True)
  (as_, la_s), (bs, lb_s) = _window(sa_ref, h, plan.ds, True), _window(sb_ref, h, plan.ds, True)
  zt, zs = _logits_KQ(bt, at, valid_KQ, plan.scale_t), _logits_KQ(bs, as_, valid_KQ, plan.scale_s)
  dzt, dzs = dz_of(zt, zs)
  sides = [(dzs, as_, bs, la_s, lb_s, accs[-2], accs[-1])]
  if plan.teacher_grads:
    sides.append((dzt, at, bt, la_t, lb_t, accs[0], accs[1]))
  for dz, a, b, la, lb, acc_a, acc_b in sides:
    acc_a[:, la] += _grad_dot(dz, b, ((0,), (0,)))
    acc_b[:, lb] += _grad_dot(dz, a, ((1,), (0,)))


def _one_block_kernel(plan, kinfo_ref, qseg_ref, ta_ref, tb_ref, sa_ref, sb_ref, refs, dz_for):
  """The body of a one-block kernel (grid (b, group, 1, 1)): every head through _one_block_head, with
  dz_for(h, valid_KQ) -> its dz_of. refs: the gradient outputs (d_ta, d_tb, d_sa, d_sb, or d_sa, d_sb
  without the teacher's gradients), then one fp32 accumulator for each."""
  n = len(refs) // 2
  outs, accs = refs[:n], refs[n:]
  for acc in accs:
    acc[...] = jnp.zeros(acc.shape, jnp.float32)
  valid_KQ = _validity_KQ(kinfo_ref, qseg_ref)
  _for_heads(plan, lambda h: _one_block_head(plan, h, ta_ref, tb_ref, sa_ref, sb_ref, valid_KQ, accs,
                                             dz_for(h, valid_KQ)))
  scales = ((plan.scale_t,) * 2 if plan.teacher_grads else ()) + (plan.scale_s,) * 2
  for out, acc, scale in zip(outs, accs, scales):  # z = scale · (a · b): both sides carry the scale
    out[...] = acc[...] * scale


def _grad_one_block_kernel(kinfo_ref, qseg_ref, ta_ref, tb_ref, sa_ref, sb_ref, g_ref, lse_t_ref,
                           lse_s_ref, c_ref, *refs, plan):
  """Both sides' gradients when one block holds every query and key (nq = nk = 1, T ≤ the block):
  each head's logits are computed once for d_a and d_b, where the two-kernel backward computes them
  once in each kernel. refs as _one_block_kernel's."""
  def dz_for(h, valid_KQ):
    row = pl.ds(h, 1)
    return lambda zt, zs: _dz(zt, zs, valid_KQ, g_ref[row, :], lse_t_ref[row, :], lse_s_ref[row, :],
                              c_ref[row, :])

  _one_block_kernel(plan, kinfo_ref, qseg_ref, ta_ref, tb_ref, sa_ref, sb_ref, refs, dz_for)


def _value_and_grad_kernel(kinfo_ref, qseg_ref, ta_ref, tb_ref, sa_ref, sb_ref, w_ref, kl_ref, *refs,
                           plan):
  """KL rows and the gradients of Σ w·KL in one pass, when one block holds every query and key: each
  head's logits give the row statistics (lse_T, lse_S, c) and, right away, dz and both sides'
  gradients, where the forward and backward kernels compute the logits once each. w_ref: the rows'
  weights [hc, bq] (kl_rows' weights: the loss's token weights); refs as _one_block_kernel's."""
  def dz_for(h, valid_KQ):
    row = pl.ds(h, 1)

    def dz_of(zt, zs):
      # The row statistics over all keys at once (no online rescaling: the block holds them all).
      mt, ms = zt.max(0, keepdims=True), zs.max(0, keepdims=True)
      et, es = jnp.exp(zt - mt), jnp.exp(zs - ms)
      lt, ls = et.sum(0, keepdims=True), es.sum(0, keepdims=True)
      # Masked keys hold MASK_VALUE in both logits, so zt − zs = 0 there (as in _forward_kernel).
      c = (et * (zt - zs)).sum(0, keepdims=True) / lt
      kl_ref[row, :] = c - (mt + jnp.log(lt)) + (ms + jnp.log(ls))
      # where(): a row with no visible key has every logit at MASK_VALUE and exp(z − m) = 1 (as _dz).
      pt = jnp.where(valid_KQ, et * (1.0 / lt), 0.0)  # one division per row, not per pair
      ps = jnp.where(valid_KQ, es * (1.0 / ls), 0.0)
      return _dz_of_probs(zt, zs, pt, ps, w_ref[row, :], c)

    return dz_of

  _one_block_kernel(plan, kinfo_ref, qseg_ref, ta_ref, tb_ref, sa_ref, sb_ref, refs, dz_for)


# -------------------------------------------------------------------------------------- pallas_call


def _specs(plan, keys_outer):
  """BlockSpecs of (kinfo, qseg, ta, tb, sa, sb, rows): grid (b, group, i, j), or (b, group, j, i) when
  the key blocks are the outer loop. `rows` is a [B, G, hc, Tp] per-row array (kl, lse, c, g)."""
  qk = (lambda i, j: (j, i)) if keys_outer else (lambda i, j: (i, j))

  def spec(shape, index):
    return pl.BlockSpec(shape, lambda b, g, x, y: index(b, g, *qk(x, y)))

  wt, ws = plan.hc * plan.dt, plan.hc * plan.ds
  return dict(
      kinfo=spec((None, 2, plan.bk), lambda b, g, i, j: (b, 0, j)),
      qseg=spec((None, 1, plan.bq), lambda b, g, i, j: (b, 0, i)),
      ta=spec((None, plan.bq, wt), lambda b, g, i, j: (b, i, g)),
      tb=spec((None, plan.bk, wt), lambda b, g, i, j: (b, j, g)),
      sa=spec((None, plan.bq, ws), lambda b, g, i, j: (b, i, g)),
      sb=spec((None, plan.bk, ws), lambda b, g, i, j: (b, j, g)),
      rows=spec((None, None, plan.hc, plan.bq), lambda b, g, i, j: (b, g, 0, i)),
  )


def _grid(plan, keys_outer):
  inner = (plan.nk, plan.nq) if keys_outer else (plan.nq, plan.nk)
  return (plan.batch, plan.groups) + inner


def _params(plan):
  # The last grid axis carries the VMEM accumulators; the others are independent (v4/v5p megacore
  # splits them across the two TensorCores). Blocks chosen by hand may need more than the budget: ask
  # for it (a v4 then fails to compile rather than spill).
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                              vmem_limit_bytes=max(kernel_blocks.VMEM_BUDGET, plan.vmem_bytes * 5 // 4))


def _rows_shape(plan):
  return jax.ShapeDtypeStruct((plan.batch, plan.groups, plan.hc, plan.tp), jnp.float32)


def _forward_call(plan, kinfo, qseg, ta, tb, sa, sb, residuals):
  """kl [B, G, hc, Tp], and with residuals also lse_t, lse_s, c of the same shape."""
  s = _specs(plan, keys_outer=False)
  n_out = 4 if residuals else 1
  row_scratch = pltpu.VMEM((plan.hc, plan.bq), jnp.float32)
  return pl.pallas_call(
      functools.partial(_forward_kernel, plan=plan, residuals=residuals),
      grid=_grid(plan, keys_outer=False),
      in_specs=[s["kinfo"], s["qseg"], s["ta"], s["tb"], s["sa"], s["sb"]],
      out_specs=[s["rows"]] * n_out,
      out_shape=[_rows_shape(plan)] * n_out,
      scratch_shapes=[row_scratch] * 5,  # m_t, l_t, m_s, l_s, acc
      compiler_params=_params(plan),
      cost_estimate=relation_plan.cost(plan, "forward", n_out),
      interpret=plan.interpret,
      name="relation_kl_forward",
  )(kinfo, qseg, ta, tb, sa, sb)


def _backward_call(plan, kind, kinfo, qseg, ta, tb, sa, sb, g, lse_t, lse_s, c):
  """kind "dq": (d_ta, d_sa); "dk": (d_tb, d_sb); token-major like the inputs, fp32. Without the
  teacher's gradients its entry is None."""
  keys_outer = kind == "dk"
  s = _specs(plan, keys_outer)
  t_spec, s_spec = (s["tb"], s["sb"]) if keys_outer else (s["ta"], s["sa"])
  rows = plan.bk if keys_outer else plan.bq
  out_t = [jax.ShapeDtypeStruct(ta.shape, jnp.float32)] if plan.teacher_grads else []
  acc_t = [pltpu.VMEM((rows, plan.hc * plan.dt), jnp.float32)] if plan.teacher_grads else []
  out = pl.pallas_call(
      functools.partial(_grad_kernel, plan=plan, keys_outer=keys_outer),
      grid=_grid(plan, keys_outer),
      in_specs=[s["kinfo"], s["qseg"], s["ta"], s["tb"], s["sa"], s["sb"]] + [s["rows"]] * 4,
      out_specs=[t_spec] * len(out_t) + [s_spec],
      out_shape=out_t + [jax.ShapeDtypeStruct(sa.shape, jnp.float32)],
      scratch_shapes=acc_t + [pltpu.VMEM((rows, plan.hc * plan.ds), jnp.float32)],
      compiler_params=_params(plan),
      cost_estimate=relation_plan.cost(plan, kind),
      interpret=plan.interpret,
      name=f"relation_kl_{kind}",
  )(kinfo, qseg, ta, tb, sa, sb, g, lse_t, lse_s, c)
  return tuple(out) if plan.teacher_grads else (None, out[0])


def _one_block_call(plan, kind, kinfo, qseg, ta, tb, sa, sb, *rows):
  """One kernel for a one-block plan (relation_plan.one_block). kind "both": rows (g, lse_t, lse_s, c), gives
  (d_ta, d_tb, d_sa, d_sb) (_grad_one_block_kernel); "value_and_grad": rows (w,), gives
  (kl, d_ta, d_tb, d_sa, d_sb) of Σ w·KL (_value_and_grad_kernel). The teacher's gradients are None
  without teacher_grads; all fp32, token-major like the inputs."""
  s = _specs(plan, keys_outer=False)
  pairs = [(s["ta"], ta, plan.dt), (s["tb"], tb, plan.dt)] if plan.teacher_grads else []
  pairs += [(s["sa"], sa, plan.ds), (s["sb"], sb, plan.ds)]
  kl = [(s["rows"], _rows_shape(plan))] if kind == "value_and_grad" else []
  kernel = _value_and_grad_kernel if kind == "value_and_grad" else _grad_one_block_kernel
  out = pl.pallas_call(
      functools.partial(kernel, plan=plan),
      grid=_grid(plan, keys_outer=False),
      in_specs=[s["kinfo"], s["qseg"], s["ta"], s["tb"], s["sa"], s["sb"]] + [s["rows"]] * len(rows),
      out_specs=[spec for spec, _ in kl] + [spec for spec, _, _ in pairs],
      out_shape=[shape for _, shape in kl] + [jax.ShapeDtypeStruct(x.shape, jnp.float32) for _, x, _ in pairs],
      scratch_shapes=[pltpu.VMEM((plan.tp, plan.hc * w), jnp.float32) for _, _, w in pairs],
      compiler_params=_params(plan),
      cost_estimate=relation_plan.cost(plan, kind),
      interpret=plan.interpret,
      name="relation_kl_value_and_grad" if kl else "relation_kl_grad",
  )(kinfo, qseg, ta, tb, sa, sb, *rows)
  out = tuple(out)
  grads = out[len(kl):] if plan.teacher_grads else (None, None) + out[len(kl):]
  return out[:len(kl)] + grads


# ------------------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _kl_token_major(ta, tb, sa, sb, kinfo, qseg, plan):
  """kl [B, G, hc, Tp] of token-major inputs [B, Tp, C·width] (relation_plan.token_major)."""
  return _forward_call(plan, kinfo, qseg, ta, tb, sa, sb, residuals=False)[0]


def _kl_fwd(ta, tb, sa, sb, kinfo, qseg, plan):
  kl, lse_t, lse_s, c = _forward_call(plan, kinfo, qseg, ta, tb, sa, sb, residuals=True)
  return kl, (ta, tb, sa, sb, kinfo, qseg, lse_t, lse_s, c)


def _backward(plan, *args):
  """(d_ta, d_tb, d_sa, d_sb) in the inputs' dtype from the rows' residuals and cotangent g (args as
  _backward_call's): one kernel for a one-block plan, else the query- and key-block kernels. The kernels
  give fp32; a teacher held constant gets zeros."""
  if relation_plan.one_block(plan):
    d_ta, d_tb, d_sa, d_sb = _one_block_call(plan, "both", *args)
  else:
    d_ta, d_sa = _backward_call(plan, "dq", *args)
    d_tb, d_sb = _backward_call(plan, "dk", *args)
  return _in_input_dtype(plan, (d_ta, d_tb, d_sa, d_sb))


def _in_input_dtype(plan, grads):
  """fp32 token-major gradients (None: zeros) of ta, tb, sa, sb cast to the inputs' dtype."""
  widths = (plan.dt, plan.dt, plan.ds, plan.ds)
  return tuple(jnp.zeros((plan.batch, plan.tp, plan.heads * w), plan.dtype) if d is None
               else d.astype(plan.dtype) for d, w in zip(grads, widths))


def _kl_bwd(plan, res, g):
  ta, tb, sa, sb, kinfo, qseg, lse_t, lse_s, c = res
  return _backward(plan, kinfo, qseg, ta, tb, sa, sb, g, lse_t, lse_s, c) + (None, None)


_kl_token_major.defvjp(_kl_fwd, _kl_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _weighted_kl_token_major(ta, tb, sa, sb, kinfo, qseg, w, plan):
  """Σ_rows w·KL [B] of token-major inputs; w [B, G, hc, Tp] the rows' weights."""
  kl = _forward_call(plan, kinfo, qseg, ta, tb, sa, sb, residuals=False)[0]
  return (kl * w).sum((1, 2, 3))


def _weighted_fwd(ta, tb, sa, sb, kinfo, qseg, w, plan):
  if relation_plan.one_block(plan):  # the gradients of Σ w·KL now, with the value: the bwd only scales them
    kl, *grads = _one_block_call(plan, "value_and_grad", kinfo, qseg, ta, tb, sa, sb, w)
    return (kl * w).sum((1, 2, 3)), (kl, tuple(grads), None)
  kl, lse_t, lse_s, c = _forward_call(plan, kinfo, qseg, ta, tb, sa, sb, residuals=True)
  return (kl * w).sum((1, 2, 3)), (kl, None, (ta, tb, sa, sb, kinfo, qseg, w, lse_t, lse_s, c))


def _weighted_bwd(plan, res, g_B):
  kl, grads, rest = res
  g_rows = g_B[:, None, None, None]
  if grads is not None:  # ∂(g·Σ w·KL) = g · ∂(Σ w·KL), per batch row
    d = _in_input_dtype(plan, (None if x is None else x * g_B[:, None, None] for x in grads))
  else:
    ta, tb, sa, sb, kinfo, qseg, w, lse_t, lse_s, c = rest
    d = _backward(plan, kinfo, qseg, ta, tb, sa, sb, w * g_rows, lse_t, lse_s, c)
  return d + (None, None, kl * g_rows)


_weighted_kl_token_major.defvjp(_weighted_fwd, _weighted_bwd)


# -------------------------------------------------------------------------------------------- public


def kl_rows(ta_BCTd, tb_BCTd, sa_BCTe, sb_BCTe, mask_BT, seg_BT, weights_BT=None, *, scale=(1.0, 1.0),
            teacher_grads=True, block_q=None, block_k=None, interpret=False):
  """KL_t [B, C, T] of every query row: losses.blockwise_kl_rows's numbers, from Pallas TPU kernels.
  With weights_BT [B, T]: their weighted sums instead, [B] = Σ_{c,t} w[b, t]·KL_t[b, c], whose
  gradients come from the forward's own kernel when one block holds every query and key (T ≤ 512: the
  logits computed once in all, where the rows' VJP computes them twice).

  ta, tb: the teacher's relation inputs [B, C, T, d], heads-major; sa, sb: the student's [B, C, T, e]
  (d and e may differ). The logits are scale[0] · ta·tbᵀ and scale[1] · sa·sbᵀ (1/√d, 1/√e for
  MiniLM; or pre-scale ta, sa and keep 1). All four bf16: bf16 kept, each product exact, the arithmetic
  fp32 (gradients rounded to bf16 at the end); else fp32. mask_BT: bool, which keys are real;
  seg_BT: int32 segment ids (zeros for none): key s is visible from query t iff mask[s] and
  seg[t] == seg[s]. A row with no visible key gives a finite value (0). block_q, block_k: multiples of
  128 (default: up to 512 as VMEM allows, see kernel_blocks.auto_block); T is padded to a multiple of both with
  invisible keys. interpret: run the kernels in Pallas interpret mode (any backend). Differentiable in
  ta, tb, sa, sb (a custom VJP that saves only lse_T, lse_S and c per row); teacher_grads=False: the
  teacher's inputs are held constant (stop_gradient: their gradients are zeros, never computed).
  """
  b, c, t, d = ta_BCTd.shape
  e = sa_BCTe.shape[-1]
  if tb_BCTd.shape != ta_BCTd.shape or sb_BCTe.shape != sa_BCTe.shape or sa_BCTe.shape[:3] != (b, c, t):
    raise ValueError(f"kl_rows needs ta, tb [B, C, T, d] and sa, sb [B, C, T, e], got {ta_BCTd.shape}, "
                     f"{tb_BCTd.shape}, {sa_BCTe.shape}, {sb_BCTe.shape}")
  if mask_BT.shape != (b, t) or seg_BT.shape != (b, t):
    raise ValueError(f"mask and seg must be [B, T] = {(b, t)}, got {mask_BT.shape} and {seg_BT.shape}")
  bf16 = all(x.dtype == jnp.bfloat16 for x in (ta_BCTd, tb_BCTd, sa_BCTe, sb_BCTe))
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  plan = relation_plan.make_plan(b, c, t, d, e, block_q, block_k, interpret, dtype, scale, teacher_grads)
  if not teacher_grads:
    ta_BCTd, tb_BCTd = jax.lax.stop_gradient(ta_BCTd), jax.lax.stop_gradient(tb_BCTd)
  tm = lambda x, width: relation_plan.token_major(x.astype(dtype), plan, width)
  args = (tm(ta_BCTd, plan.dt), tm(tb_BCTd, plan.dt), tm(sa_BCTe, plan.ds), tm(sb_BCTe, plan.ds),
          relation_plan.key_info(mask_BT, seg_BT, plan),
          jnp.pad(seg_BT.astype(jnp.int32), ((0, 0), (0, plan.tp - t)))[:, None, :])
  if weights_BT is not None:
    if weights_BT.shape != (b, t):
      raise ValueError(f"weights must be [B, T] = {(b, t)}, got {weights_BT.shape}")
    w_BT = jnp.pad(weights_BT.astype(jnp.float32), ((0, 0), (0, plan.tp - t)))  # padded rows weigh 0
    w_BGHT = jnp.broadcast_to(w_BT[:, None, None, :], (b, plan.groups, plan.hc, plan.tp))
    return _weighted_kl_token_major(*args, w_BGHT, plan)
  return _kl_token_major(*args, plan).reshape(b, c, plan.tp)[:, :, :t]
