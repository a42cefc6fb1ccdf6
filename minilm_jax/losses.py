"""MiniLM self-attention relation losses (MiniLM v1, arXiv 2002.10957; MiniLMv2, arXiv 2012.15828).

Definition. For a, b of shape [B, T, D] and A relation heads (A | D), split the last axis by a plain
reshape into A heads of width d = D/A and form the relation logits Z = a_h b_hᵀ / sqrt(d) [B, A, T, T]
(teacher and student each scale by their own d). Key s is masked (large finite negative, never -inf)
where mask[s] == 0 and, with segment_ids, where segment_ids[t] != segment_ids[s]. R = softmax(Z) in
fp32 (fp64 if given fp64; bf16/fp16 inputs are cast up first). Forward KL, teacher is the target:
    KL_t = Σ_{valid s} R_T[t,s] (log R_T[t,s] − log R_S[t,s]).
reduction="example" (default, the papers' 1/(A|x|)): L = mean over examples e of
    1/(A·n_e) Σ_heads Σ_{real t in e} KL_t,
where an example is a row with ≥ 1 real token, or with segment_ids one document (row, segment id) of n_e
real tokens, so a packed row equals its documents computed alone. reduction="token":
    Σ KL_t / (A · Σ n_e).  Padded query rows never count; no real tokens at all gives 0.
v1 = R(Q,K) + R(V,V) with A = the attention heads; v2 = R(Q,Q) + R(K,K) + R(V,V) with A = A_r.
Three paths, one value: direct (the [B, A, T, T] tensors at once); chunk_heads=C, a group of C heads at
a time (lax.map + jax.checkpoint); block_keys=K, K keys at a time with an online log-sum-exp and a custom
VJP (memory O(B·A·T·K)). A fourth for TPUs, implementation="pallas": the blockwise computation as Pallas
kernels (relation_kernel.py) that keep every [T, T] block in VMEM, so nothing of size T² reaches HBM. By default sequences longer than 128 go blockwise (K = 128), shorter ones
direct, or in head chunks when [B, A, T, T] would exceed 2^26 elements; chunk_heads = A forces direct.
"""

import functools
import math
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import relation_kernel

# Masked logits (relation_kernel.py's, the same in every path): finite, far below any real logit.
_MASK_VALUE = relation_kernel.MASK_VALUE

# The direct path materialises a few [B, A, T, T] tensors; above this many elements per tensor we chunk.
_DIRECT_MAX_ELEMENTS = 2**26

# Automatically, sequences longer than this go blockwise with key blocks of this size: on 2 CPU cores
# (docs/performance.md, the relation loss alone) faster than the direct path at T = 512 and than head
# chunks at T = 2048, in a fraction of their memory; at T <= 128 the direct path is as fast. (Inside a
# whole step at T = 512 with 48 heads, one head at a time was faster on one machine: not the default.)
_AUTO_BLOCK_KEYS = 128

_REDUCTIONS = ("example", "token")


# --------------------------------------------------------------------------------------------- checks


def _as_int(x):
  try:
    return operator.index(x)
  except TypeError:
    return None


def _check_reduction(reduction):
  if reduction not in _REDUCTIONS:
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_pair(a, b, who):
  """a, b: the two inputs of one model's relation, both [B, T, D]."""
  if a.ndim != 3 or b.ndim != 3:
    raise ValueError(f"{who} inputs must be [B, T, D], got shapes {a.shape} and {b.shape}")
  if a.shape != b.shape:
    raise ValueError(f"{who} relation inputs differ in shape: {a.shape} vs {b.shape}")


def _check_inputs(teacher_a, teacher_b, student_a, student_b, mask, num_heads, segment_ids):
  _check_pair(teacher_a, teacher_b, "teacher")
  _check_pair(student_a, student_b, "student")
  if teacher_a.shape[:2] != student_a.shape[:2]:
    raise ValueError(
        f"teacher [B, T] = {teacher_a.shape[:2]} does not match student [B, T] = {student_a.shape[:2]}"
    )
  bt = tuple(teacher_a.shape[:2])
  if np.shape(mask) != bt:
    raise ValueError(f"mask shape {np.shape(mask)} does not match inputs [B, T] = {bt}")
  if segment_ids is not None and np.shape(segment_ids) != bt:
    raise ValueError(f"segment_ids shape {np.shape(segment_ids)} does not match inputs [B, T] = {bt}")
  if _as_int(num_heads) is None or num_heads < 1:
    raise ValueError(f"relation heads must be a positive int, got {num_heads!r}")
  for who, width in (("teacher", teacher_a.shape[-1]), ("student", student_a.shape[-1])):
    if width % num_heads:
      raise ValueError(f"relation heads {num_heads} do not divide {who} width {width}")


def _check_qkv(qkv, who):
  if len(qkv) != 3:
    raise ValueError(f"{who}_qkv must be (q, k, v), got {len(qkv)} arrays")
  shapes = tuple(tuple(x.shape) for x in qkv)
  if len(set(shapes)) != 1:
    raise ValueError(f"{who} q/k/v shapes differ: q {shapes[0]}, k {shapes[1]}, v {shapes[2]}")


def _check_weights(weights, n):
  if len(weights) != n:
    raise ValueError(f"expected {n} loss weights, got {len(weights)}: {tuple(weights)}")


# ----------------------------------------------------------------------------------- masks, weights


def _key_valid(mask_BT, segment_ids_BT):
  """Which keys each query may attend to, broadcastable over heads: [B, 1, 1, S] or [B, 1, T, S]."""
  if segment_ids_BT is None:
    return mask_BT[:, None, None, :]
  same_doc_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (mask_BT[:, None, :] & same_doc_BTS)[:, None]


def _document_lengths(mask_BT, seg_BT):
  """n_doc [B, T]: the real tokens of t's example (its row, or with segments its (row, segment)), by
  sorting each row's segment ids: O(T log T), never a [B, T, T] comparison."""
  if seg_BT is None:
    return jnp.broadcast_to(mask_BT.sum(-1, keepdims=True), mask_BT.shape)

  def row(seg_T, real_T):
    order = jnp.argsort(seg_T)
    sorted_T = seg_T[order]
    real_before = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(real_T[order].astype(jnp.int32))])
    lo, hi = jnp.searchsorted(sorted_T, seg_T, "left"), jnp.searchsorted(sorted_T, seg_T, "right")
    return real_before[hi] - real_before[lo]

  return jax.vmap(row)(seg_BT, mask_BT)


def _token_weights(mask_BT, seg_BT, num_heads, reduction, dtype):
  """Per-query-token weight w_BT so that the loss is Σ_{b,h,t} w[b,t] KL[b,h,t].

  example: 1/(A · n_doc(t) · number of docs); token: 1/(A · Σ n). Padded tokens get 0.
  """
  real_BT = mask_BT.astype(dtype)
  if reduction == "token":
    return real_BT / (num_heads * jnp.maximum(real_BT.sum(), 1.0))
  # n_doc(t) = number of keys visible from t: the example's length, or the document's with segments.
  # For real t it is ≥ 1 (t sees itself); clamp only to keep padded rows finite.
  n_doc_BT = _document_lengths(mask_BT, seg_BT).astype(dtype)
  inv_n_BT = real_BT / jnp.maximum(n_doc_BT, 1.0)
  # Each document's tokens contribute n · (1/n) = 1; round away the float summation error.
  num_docs = jnp.round(inv_n_BT.sum())
  return inv_n_BT / (num_heads * jnp.maximum(num_docs, 1.0))


# --------------------------------------------------------------------------------------------- KL


def _logsumexp(z_BCTS):
  """log Σ_s exp(z) [B, C, T]; z is finite (masked with a finite value), so no inf handling."""
  m_BCT = jax.lax.stop_gradient(z_BCTS.max(-1))  # any m is exact; stop_gradient keeps the vjp lean
  return m_BCT + jnp.log(jnp.exp(z_BCTS - m_BCT[..., None]).sum(-1))


def _heads_kl(ta_BTCd, tb_BTCd, sa_BTCd, sb_BTCd, valid_B1TS, w_BT):
  """Σ_{b,c,t} w[b,t] KL_t for one group of C heads. Inputs are pre-scaled by 1/sqrt(d), fp32.

  Shared by the direct path (one group of all heads) and the chunked path (lax.map over groups).
  """
  # Heads-major layout first: XLA:CPU runs [B·C] batched matmuls ~3x faster than with the head axis
  # in the middle of the operands (measured on 32×12×128×32).
  heads_major = lambda x_BTCd: jnp.swapaxes(x_BTCd, 1, 2)
  logits = lambda a, b: jnp.einsum("bctd,bcsd->bcts", heads_major(a), heads_major(b))
  zt_BCTS = jnp.where(valid_B1TS, logits(ta_BTCd, tb_BTCd), _MASK_VALUE)
  zs_BCTS = jnp.where(valid_B1TS, logits(sa_BTCd, sb_BTCd), _MASK_VALUE)
  lse_t_BCT, lse_s_BCT = _logsumexp(zt_BCTS), _logsumexp(zs_BCTS)
  # log P_T − log P_S = (z_T − z_S) − (lse_T − lse_S): written this way the only [B, C, T, T] tensors
  # are the two logit tensors; the rest fuses into one reduction (no log-softmax tensors stored).
  dlse_BCT1 = (lse_t_BCT - lse_s_BCT)[..., None]
  pt_BCTS = jnp.exp(zt_BCTS - lse_t_BCT[..., None])
  # where(), not a multiplication by the mask, so a masked 0·(log 0 − log 0) can never be NaN.
  kl_BCT = jnp.where(valid_B1TS, pt_BCTS * ((zt_BCTS - zs_BCTS) - dlse_BCT1), 0.0).sum(-1)
  return jnp.einsum("bct,bt->", kl_BCT, w_BT)


# ------------------------------------------------------------------------------- blockwise KL
#
# The same per-query KL, computed over blocks of K keys with an online log-sum-exp (as flash attention
# does), and a custom VJP whose backward also goes block by block: neither pass holds a [B, A, T, T]
# tensor, only [B, A, T, K] ones, so memory is O(B·A·T·K). With z_T, z_S the logits of one query row,
# p = softmax(z_T), q = softmax(z_S) and c = Σ p (z_T − z_S):
#   KL = c − lse(z_T) + lse(z_S),   ∂KL/∂z_T = p ((z_T − z_S) − c),   ∂KL/∂z_S = q − p.


def _key_blocks(x_BCSd, block):
  """[n, B, C, K, d]: the keys split into n blocks of K (zero keys pad the last one)."""
  b, c, s, d = x_BCSd.shape
  n = -(-s // block)
  x_BCSd = jnp.pad(x_BCSd, ((0, 0), (0, 0), (0, n * block - s), (0, 0)))
  return jnp.moveaxis(x_BCSd.reshape(b, c, n, block, d), 2, 0)


def _masks_of_blocks(mask_BS, seg_BS, block):
  """Key validity [n, B, K] and segment ids [n, B, K] per key block (padding keys are invalid)."""
  b, s = mask_BS.shape
  n = -(-s // block)
  pad = lambda x, v: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, n * block - s)), constant_values=v)
                                  .reshape(b, n, block), 1, 0)
  return pad(mask_BS, False), pad(seg_BS, 0)


def _block_logits(q_BCTd, k_BCKd, ok_BK, seg_BT, kseg_BK):
  """Masked logits [B, C, T, K] of one key block and their validity [B, 1, T, K]."""
  valid_B1TK = (ok_BK[:, None, :] & (seg_BT[:, :, None] == kseg_BK[:, None, :]))[:, None]
  z_BCTK = jnp.einsum("bctd,bckd->bctk", q_BCTd, k_BCKd)
  return jnp.where(valid_B1TK, z_BCTK, _MASK_VALUE), valid_B1TK


def _blockwise_forward(ta, tb, sa, sb, mask_BS, seg_BT, block):
  dtype = ta.dtype
  tb_n, sb_n = _key_blocks(tb, block), _key_blocks(sb, block)
  ok_n, kseg_n = _masks_of_blocks(mask_BS, seg_BT, block)
  shape_BCT = ta.shape[:3]

  def body(carry, xs):
    m_t, l_t, m_s, l_s, acc = carry
    tb_j, sb_j, ok_j, kseg_j = xs
    zt, valid = _block_logits(ta, tb_j, ok_j, seg_BT, kseg_j)
    zs, _ = _block_logits(sa, sb_j, ok_j, seg_BT, kseg_j)
    mt_new, ms_new = jnp.maximum(m_t, zt.max(-1)), jnp.maximum(m_s, zs.max(-1))
    et = jnp.exp(zt - mt_new[..., None])
    rescale_t = jnp.exp(m_t - mt_new)
    l_t = l_t * rescale_t + et.sum(-1)
    acc = acc * rescale_t + jnp.where(valid, et * (zt - zs), 0.0).sum(-1)
    l_s = l_s * jnp.exp(m_s - ms_new) + jnp.exp(zs - ms_new[..., None]).sum(-1)
    return (mt_new, l_t, ms_new, l_s, acc), None

  init = tuple(jnp.full(shape_BCT, v, dtype) for v in (_MASK_VALUE, 0.0, _MASK_VALUE, 0.0, 0.0))
  (m_t, l_t, m_s, l_s, acc), _ = jax.lax.scan(body, init, (tb_n, sb_n, ok_n, kseg_n))
  lse_t, lse_s, c = m_t + jnp.log(l_t), m_s + jnp.log(l_s), acc / l_t
  return c - lse_t + lse_s, (lse_t, lse_s, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def blockwise_kl_rows(ta, tb, sa, sb, mask_BS, seg_BT, block):
  """KL_t [B, C, T] of every query row, for heads-major, pre-scaled inputs [B, C, T, d] (teacher's d
  and student's d may differ), computed `block` keys at a time."""
  return _blockwise_forward(ta, tb, sa, sb, mask_BS, seg_BT, block)[0]


def _blockwise_fwd(ta, tb, sa, sb, mask_BS, seg_BT, block):
  kl, (lse_t, lse_s, c) = _blockwise_forward(ta, tb, sa, sb, mask_BS, seg_BT, block)
  return kl, (ta, tb, sa, sb, mask_BS, seg_BT, lse_t, lse_s, c)


def _blockwise_bwd(block, res, g_BCT):
  ta, tb, sa, sb, mask_BS, seg_BT, lse_t, lse_s, c = res
  tb_n, sb_n = _key_blocks(tb, block), _key_blocks(sb, block)
  ok_n, kseg_n = _masks_of_blocks(mask_BS, seg_BT, block)
  g = g_BCT[..., None]

  def body(carry, xs):
    d_ta, d_sa = carry
    tb_j, sb_j, ok_j, kseg_j = xs
    zt, valid = _block_logits(ta, tb_j, ok_j, seg_BT, kseg_j)
    zs, _ = _block_logits(sa, sb_j, ok_j, seg_BT, kseg_j)
    pt = jnp.where(valid, jnp.exp(zt - lse_t[..., None]), 0.0)
    ps = jnp.where(valid, jnp.exp(zs - lse_s[..., None]), 0.0)
    dzt = g * pt * ((zt - zs) - c[..., None])
    dzs = g * (ps - pt)
    d_ta = d_ta + jnp.einsum("bctk,bckd->bctd", dzt, tb_j)
    d_sa = d_sa + jnp.einsum("bctk,bckd->bctd", dzs, sb_j)
    return (d_ta, d_sa), (jnp.einsum("bctk,bctd->bckd", dzt, ta), jnp.einsum("bctk,bctd->bckd", dzs, sa))

  (d_ta, d_sa), (d_tb_n, d_sb_n) = jax.lax.scan(body, (jnp.zeros_like(ta), jnp.zeros_like(sa)),
                                                 (tb_n, sb_n, ok_n, kseg_n))
  unblock = lambda d_nBCKd, like: jnp.moveaxis(d_nBCKd, 0, 2).reshape(
      like.shape[:2] + (-1, like.shape[-1]))[:, :, :like.shape[2]]
  return d_ta, unblock(d_tb_n, tb), d_sa, unblock(d_sb_n, sb), None, None


blockwise_kl_rows.defvjp(_blockwise_fwd, _blockwise_bwd)


def _blockwise_heads_kl(ta_BTAd, tb_BTAd, sa_BTAd, sb_BTAd, mask_BT, seg_BT, w_BT, block):
  """Σ_{b,a,t} w[b,t] KL_t over all heads, `block` keys at a time (see blockwise_kl_rows)."""
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  seg_BT = jnp.zeros(mask_BT.shape, jnp.int32) if seg_BT is None else seg_BT
  block = min(int(block), mask_BT.shape[1])  # a block wider than T would only add padding keys
  kl_BAT = blockwise_kl_rows(*map(heads_major, (ta_BTAd, tb_BTAd, sa_BTAd, sb_BTAd)), mask_BT, seg_BT,
                              block)
  return jnp.einsum("bat,bt->", kl_BAT, w_BT)


def _auto_block_keys(seq_len):
  """The automatic key block: _AUTO_BLOCK_KEYS above that many tokens, else None (direct or chunked)."""
  return _AUTO_BLOCK_KEYS if seq_len > _AUTO_BLOCK_KEYS else None


def _auto_chunk_heads(batch, num_heads, seq_len):
  """Largest divisor of A whose [B, C, T, T] tensors stay under the direct-path budget."""
  if batch * num_heads * seq_len * seq_len <= _DIRECT_MAX_ELEMENTS:
    return None
  for c in range(num_heads, 0, -1):
    if num_heads % c == 0 and batch * c * seq_len * seq_len <= _DIRECT_MAX_ELEMENTS:
      return c
  return 1


IMPLEMENTATIONS = ("xla", "pallas", "pallas_interpret")


def _kl_rows_of(implementation):
  """The kl_rows function of a Pallas implementation: a name, or a callable standing in for
  relation_kernel.kl_rows (the trainer's, run per device under shard_map)."""
  if callable(implementation):
    return implementation
  return functools.partial(relation_kernel.kl_rows, interpret=implementation == "pallas_interpret")


def _relation_kl_sum(teacher_a, teacher_b, student_a, student_b, keys, num_heads, chunk_heads,
                     block_keys=None, implementation="xla"):
  """Weighted KL sum over all heads; inputs already checked. keys: _prepare's."""
  batch, seq_len = teacher_a.shape[:2]
  w_BT = keys.w
  if not callable(implementation) and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
  if implementation != "xla":
    return _pallas_heads_kl(teacher_a, teacher_b, student_a, student_b, keys, num_heads,
                            _kl_rows_of(implementation))
  if block_keys is not None and (_as_int(block_keys) is None or block_keys < 1):
    raise ValueError(f"block_keys must be a positive int, got {block_keys!r}")
  if block_keys is None and chunk_heads is None:  # automatic: blockwise for long sequences
    block_keys = _auto_block_keys(seq_len)
  if chunk_heads is None:
    chunk_heads = _auto_chunk_heads(batch, num_heads, seq_len)
  elif _as_int(chunk_heads) is None or chunk_heads < 1 or num_heads % chunk_heads:
    raise ValueError(f"chunk_heads {chunk_heads!r} does not divide relation heads {num_heads}")
  if chunk_heads == num_heads:
    chunk_heads = None  # one chunk of everything: the direct path, no scan or remat overhead
  dtype = w_BT.dtype

  def prep(x_BTD):
    # fp32 before the matmul; fold 1/sqrt(d) into one side (B·T·D work instead of B·A·T²).
    x_BTD = x_BTD.astype(dtype)
    return x_BTD, x_BTD.shape[-1] // num_heads

  (ta, dt), (tb, _), (sa, ds), (sb, _) = map(prep, (teacher_a, teacher_b, student_a, student_b))
  ta = ta * (1.0 / math.sqrt(dt))
  sa = sa * (1.0 / math.sqrt(ds))

  split = lambda x, d: x.reshape(batch, seq_len, num_heads, d)
  if block_keys is not None:
    return _blockwise_heads_kl(split(ta, dt), split(tb, dt), split(sa, ds), split(sb, ds), keys.mask,
                               keys.seg, w_BT, block_keys)
  valid_B1TS = keys.valid
  if chunk_heads is None:
    return _heads_kl(split(ta, dt), split(tb, dt), split(sa, ds), split(sb, ds), valid_B1TS, w_BT)

  groups = num_heads // chunk_heads

  def to_groups(x_BTD, d):
    # Heads are contiguous slices of D, so group g is the contiguous slice g·C·d:(g+1)·C·d.
    return jnp.moveaxis(x_BTD.reshape(batch, seq_len, groups, chunk_heads, d), 2, 0)

  # checkpoint: the backward pass recomputes each group's [B, C, T, T] tensors instead of the scan
  # stacking them as residuals, which would rebuild the full [B, A, T, T] footprint.
  # (prevent_cse is unnecessary inside a scan, which already keeps XLA from CSE-ing the recompute.)
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def group_kl(xs):
    return _heads_kl(*xs, valid_B1TS, w_BT)

  xs = (to_groups(ta, dt), to_groups(tb, dt), to_groups(sa, ds), to_groups(sb, ds))
  return jax.lax.map(group_kl, xs).sum()


def _pallas_heads_kl(teacher_a, teacher_b, student_a, student_b, keys, num_heads, kl_rows):
  """The weighted KL sum through relation_kernel.kl_rows (heads-major inputs; bf16 ones stay bf16, as
  its products of them are exact; the 1/√d scale goes to the logits, where it rounds nothing)."""
  batch, seq_len = teacher_a.shape[:2]
  bf16 = all(x.dtype == jnp.bfloat16 for x in (teacher_a, teacher_b, student_a, student_b))

  def heads(x_BTD):
    x = x_BTD if bf16 else x_BTD.astype(keys.w.dtype)
    return x.reshape(batch, seq_len, num_heads, -1).transpose(0, 2, 1, 3)

  width = lambda x: x.shape[-1] // num_heads
  seg_BT = jnp.zeros(keys.mask.shape, jnp.int32) if keys.seg is None else keys.seg.astype(jnp.int32)
  # The weighted sums per example [B]: the kernels take the weights, so that under differentiation one
  # kernel gives the value and the gradients (relation_kernel.kl_rows).
  kl_B = kl_rows(heads(teacher_a), heads(teacher_b), heads(student_a), heads(student_b), keys.mask,
                 seg_BT, keys.w, scale=(1.0 / math.sqrt(width(teacher_a)), 1.0 / math.sqrt(width(student_a))))
  return kl_B.sum()


class _Keys(NamedTuple):
  w: jax.Array       # [B, T] token weights (_token_weights)
  mask: jax.Array    # [B, T] bool
  seg: Optional[jax.Array]  # [B, T] segment ids, or None

  @property
  def valid(self):
    """[B, 1, 1, S] or, with segments, [B, 1, T, S]: which keys each query sees (built only by the
    paths that use it; the blockwise path makes it block by block)."""
    return _key_valid(self.mask, self.seg)


def _prepare(mask, segment_ids, num_heads, reduction, dtypes) -> _Keys:
  """Key validity and token weights, shared by all relations of one loss call."""
  _check_reduction(reduction)
  # fp32 at least; fp64 inputs stay fp64 (useful for finite-difference gradient checks).
  dtype = jnp.result_type(jnp.float32, *dtypes)
  mask_BT = jnp.asarray(mask) != 0
  seg_BT = None if segment_ids is None else jnp.asarray(segment_ids)
  return _Keys(_token_weights(mask_BT, seg_BT, num_heads, reduction, dtype), mask_BT, seg_BT)


# -------------------------------------------------------------------------------------------- public


def relation_kl(
    teacher_a,
    teacher_b,
    student_a,
    student_b,
    mask,
    num_heads,
    reduction="example",
    *,
    segment_ids=None,
    chunk_heads=None,
    block_keys=None,
    implementation="xla",
):
  """KL(R_T || R_S) of the relations R(a, b), reduced to a scalar (see the module docstring).

  teacher_a, teacher_b: [B, T, D_t]; student_a, student_b: [B, T, D_s]; mask, segment_ids: [B, T].
  num_heads: relation heads A (must divide D_t and D_s). chunk_heads: a divisor of A (A: the direct
  path). block_keys: K, to compute the KL K keys at a time with a custom VJP (memory O(B·A·T·K), no
  [B, A, T, T] tensor in either pass; see blockwise_kl_rows). Both None: automatic (module docstring).
  implementation: "xla" (the paths above), "pallas" (TPU kernels, relation_kernel.py),
  "pallas_interpret" (the same kernels interpreted, on any backend: for tests), or a function with
  relation_kernel.kl_rows's signature (the trainer's: the kernels per device, under shard_map).
  Returns an fp32 scalar (fp64 for fp64 inputs).
  """
  _check_inputs(teacher_a, teacher_b, student_a, student_b, mask, num_heads, segment_ids)
  keys = _prepare(
      mask,
      segment_ids,
      num_heads,
      reduction,
      (teacher_a.dtype, teacher_b.dtype, student_a.dtype, student_b.dtype),
  )
  return _relation_kl_sum(teacher_a, teacher_b, student_a, student_b, keys, num_heads, chunk_heads,
                          block_keys, implementation)


def _weighted_relations(pairs, weights, mask, num_heads, reduction, segment_ids, chunk_heads, block_keys,
                        implementation="xla"):
  """Σ_i weights[i] · relation_kl(*pairs[i]); masks and token weights computed once for all pairs."""
  for args in pairs:
    _check_inputs(*args, mask, num_heads, segment_ids)
  keys = _prepare(mask, segment_ids, num_heads, reduction, [x.dtype for args in pairs for x in args])
  total = jnp.zeros((), keys.w.dtype)
  for weight, args in zip(weights, pairs):
    if isinstance(weight, (int, float)) and weight == 0:
      continue  # a switched-off term costs nothing
    total = total + weight * _relation_kl_sum(*args, keys, num_heads, chunk_heads, block_keys,
                                              implementation)
  return total


def minilm_v1_loss(
    teacher_qkv,
    student_qkv,
    mask,
    num_heads,
    *,
    weights=(1.0, 1.0),
    reduction="example",
    segment_ids=None,
    chunk_heads=None,
    block_keys=None,
    student_num_heads=None,
    implementation="xla",
):
  """MiniLM v1: weights[0]·R(Q, K) + weights[1]·R(V, V), with A = the attention heads.

  teacher_qkv: (q, k, v) each [B, T, D_t]; student_qkv: (q, k, v) each [B, T, D_s]; mask: [B, T].
  student_num_heads: the student's native head count, if it may differ from the teacher's (v1 needs
  them equal; use v2 otherwise).
  """
  if student_num_heads is not None and student_num_heads != num_heads:
    raise ValueError(
        f"MiniLM v1 needs equal head counts: teacher {num_heads} vs student {student_num_heads} "
        "(use minilm_v2_loss with relation heads instead)"
    )
  _check_weights(weights, 2)
  _check_qkv(teacher_qkv, "teacher")
  _check_qkv(student_qkv, "student")
  (tq, tk, tv), (sq, sk, sv) = teacher_qkv, student_qkv
  pairs = ((tq, tk, sq, sk), (tv, tv, sv, sv))
  return _weighted_relations(pairs, weights, mask, num_heads, reduction, segment_ids, chunk_heads,
                             block_keys, implementation)


def minilm_v2_loss(
    teacher_qkv,
    student_qkv,
    mask,
    num_relation_heads,
    *,
    weights=(1.0, 1.0, 1.0),
    reduction="example",
    segment_ids=None,
    chunk_heads=None,
    block_keys=None,
    implementation="xla",
):
  """MiniLMv2: weights · (R(Q, Q), R(K, K), R(V, V)) with A = A_r relation heads.

  teacher_qkv: (q, k, v) each [B, T, D_t]; student_qkv: (q, k, v) each [B, T, D_s]; mask: [B, T].
  A_r must divide D_t and D_s; the native head counts do not matter.
  """
  _check_weights(weights, 3)
  _check_qkv(teacher_qkv, "teacher")
  _check_qkv(student_qkv, "student")
  pairs = tuple((t, t, s, s) for t, s in zip(teacher_qkv, student_qkv))
  return _weighted_relations(pairs, weights, mask, num_relation_heads, reduction, segment_ids, chunk_heads,
                             block_keys, implementation)


# ------------------------------------------------------------------------------ output alignment
#
# Terms that reach the student's output, which the relation losses above leave untrained (the student's
# last block above its Q/K/V). Shapes as above; widths may differ between teacher and student only after
# the caller has projected the student's side to the teacher's width (a learned map, TinyBERT's fit_dense).

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


def sentence_embedding(h_BTD, mask_BT, pooling="mean", normalize=False):
  """Pool token states into one vector per row, as sentence-transformers' Pooling (and Normalize) do.

  h_BTD: [B, T, D]; mask_BT: [B, T] (1 = token). pooling: "mean" (over real tokens), "cls" (the first
  real token, so left padding gives the same vector), "max" (over real tokens), "mean_sqrt_len" (sum over
  real tokens / sqrt(n)). normalize: divide by the L2 norm. Returns e_BD in fp32 (fp64 for fp64 input).
  """
  if pooling not in POOLING_MODES:
    raise ValueError(f"pooling {pooling!r}: use one of {', '.join(POOLING_MODES)}")
  if h_BTD.ndim != 3 or np.shape(mask_BT) != tuple(h_BTD.shape[:2]):
    raise ValueError(f"sentence_embedding needs h [B, T, D] and mask [B, T], got {h_BTD.shape} and "
                     f"{np.shape(mask_BT)}")
  dtype = jnp.result_type(jnp.float32, h_BTD.dtype)
  h_BTD = h_BTD.astype(dtype)
  real_BT = jnp.asarray(mask_BT) != 0
  n_B1 = jnp.maximum(real_BT.sum(-1, keepdims=True), 1).astype(dtype)
  if pooling == "cls":
    first_B = jnp.argmax(real_BT, axis=-1)  # the first real token, wherever the padding is
    e_BD = jnp.take_along_axis(h_BTD, first_B[:, None, None], axis=1)[:, 0]
  elif pooling == "max":
    e_BD = jnp.where(real_BT[..., None], h_BTD, jnp.finfo(dtype).min).max(1)
  else:
    s_BD = jnp.where(real_BT[..., None], h_BTD, 0.0).sum(1)
    e_BD = s_BD / (n_B1 if pooling == "mean" else jnp.sqrt(n_B1))
  e_BD = jnp.where(real_BT.any(-1, keepdims=True), e_BD, 0.0)  # a row of padding only: zeros
  if normalize:
    # sentence-transformers' Normalize: x / max(||x||, 1e-12).
    e_BD = e_BD / jnp.maximum(jnp.linalg.norm(e_BD, axis=-1, keepdims=True), 1e-12)
  return e_BD


def hidden_loss(teacher_h_BTD, student_h_BTD, mask, reduction="example", *, segment_ids=None):
  """Cosine distance 1 − cos(h_T[t], h_S[t]) between teacher and student token states, reduced like the
  relation losses (one "head"): "example" averages over each example's (or document's) real tokens, then
  over examples; "token" over all real tokens. Padded tokens never count.

  Cosine rather than MSE: a BERT LayerNorm output has a few dimensions of outsized magnitude that would
  dominate a squared error, and the cosine's scale ([0, 2], whatever the teacher) stays comparable to the
  relation KL's, so one set of term weights serves every teacher.
  teacher_h_BTD, student_h_BTD: [B, T, D] (the student already projected to the teacher's width).
  """
  if teacher_h_BTD.shape != student_h_BTD.shape or teacher_h_BTD.ndim != 3:
    raise ValueError(f"hidden_loss needs equal [B, T, D] shapes (project the student first), got "
                     f"{teacher_h_BTD.shape} and {student_h_BTD.shape}")
  bt = tuple(teacher_h_BTD.shape[:2])
  if np.shape(mask) != bt or (segment_ids is not None and np.shape(segment_ids) != bt):
    raise ValueError(f"mask/segment_ids must be [B, T] = {bt}")
  w_BT = _prepare(mask, segment_ids, 1, reduction, (teacher_h_BTD.dtype, student_h_BTD.dtype)).w
  t, s = teacher_h_BTD.astype(w_BT.dtype), student_h_BTD.astype(w_BT.dtype)
  eps = 1e-12
  cos_BT = (t * s).sum(-1) / (jnp.maximum(jnp.linalg.norm(t, axis=-1), eps)
                              * jnp.maximum(jnp.linalg.norm(s, axis=-1), eps))
  return jnp.einsum("bt,bt->", 1.0 - cos_BT, w_BT)


def embedding_loss(teacher_e_BD, student_e_BD, mask):
  """Squared L2 distance between teacher and student sentence embeddings, averaged over the rows that
  have at least one real token: the sentence-transformers distillation MSE summed over dimensions
  rather than averaged, so its scale does not shrink with the width (for normalised embeddings it is
  2 − 2·cos, in [0, 4]) and sits beside the relation KL without a width-dependent weight.

  teacher_e_BD, student_e_BD: [B, D] (see sentence_embedding; the student already projected to the
  teacher's width before pooling); mask: [B, T].
  """
  if teacher_e_BD.shape != student_e_BD.shape or teacher_e_BD.ndim != 2:
    raise ValueError(f"embedding_loss needs equal [B, D] shapes, got {teacher_e_BD.shape} and "
                     f"{student_e_BD.shape}")
  dtype = jnp.result_type(jnp.float32, teacher_e_BD.dtype, student_e_BD.dtype)
  rows_B = (jnp.asarray(mask) != 0).any(-1).astype(dtype)
  d_B = ((teacher_e_BD.astype(dtype) - student_e_BD.astype(dtype)) ** 2).sum(-1)
  return (d_B * rows_B).sum() / jnp.maximum(rows_B.sum(), 1.0)
