"""A ModernBERT encoder in flax.linen that computes what Hugging Face's PyTorch `ModernBertModel` computes.

Parameter names follow Hugging Face's (`embeddings/tok_embeddings`, `embeddings/norm`,
`layers/i/attn_norm` (none in layer 0), `layers/i/attn/Wqkv` (fused, columns [Q | K | V]),
`layers/i/attn/Wo`, `layers/i/mlp_norm`, `layers/i/mlp/Wi` (GeGLU: input and gate halves),
`layers/i/mlp/Wo`, `final_norm`), so an HF checkpoint maps onto it name for name. Pre-LayerNorm blocks,
LayerNorms without bias and no biases in the linears by default, rotary position embeddings with one theta
for the global layers and another for the local ones, global attention in the layers `layer_types` says
(every `global_attn_every_n_layers`-th) and a sliding window of ±local_attention/2 tokens elsewhere.
Positions are 0..T-1 whatever the padding, as in transformers.

The Q and K it exposes for MiniLM are taken *after* the rotation: they are what the layer's attention
actually multiplies, so the v1 attention relation softmax(QKᵀ/√d) is that layer's own attention
distribution (over all keys: the relation ignores a local layer's window), and the v2 Q-Q and K-K
relations then carry the positional structure the teacher's attention sees.

Long sequences: above `attention_chunk` tokens the attention runs a query chunk at a time
(`lax.map`, each chunk under `jax.checkpoint`), and a local layer only reads the keys within its window,
so no layer ever holds [B, H, T, T] (or, in the backward pass, keeps it); the result is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from minilm_jax import layers
from minilm_jax.model import ACTIVATIONS, EncoderOutput, dropout, fused_attention

MODEL_TYPE = "modernbert"
FULL, SLIDING = "full_attention", "sliding_attention"
ATTENTION_CHUNK = 1024  # queries per chunk above this many tokens (see the module docstring)


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
  """The fields of Hugging Face's ModernBertConfig that change the computation (and the special token
  ids, carried over to an exported student)."""
  vocab_size: int = 50368
  hidden_size: int = 768
  num_hidden_layers: int = 22
  num_attention_heads: int = 12
  intermediate_size: int = 1152
  hidden_activation: str = "gelu"
  max_position_embeddings: int = 8192
  norm_eps: float = 1e-5
  norm_bias: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  attention_dropout: float = 0.0
  embedding_dropout: float = 0.0
  mlp_dropout: float = 0.0
  layer_types: Tuple[str, ...] = ()      # () = global every 3rd layer from the first, as transformers
  local_attention: int = 128             # the window's total width: a token sees ±local_attention // 2
  global_rope_theta: float = 160000.0
  local_rope_theta: float = 10000.0
  pad_token_id: int = 50283
  bos_token_id: int = 50281
  eos_token_id: int = 50282
  cls_token_id: int = 50281
  sep_token_id: int = 50282
  model_type: str = MODEL_TYPE

  # Where the trainer finds things in the param tree (student.py).
  LAYERS = ("layers",)                              # the layers' subtree: LAYERS + (str(i),)
  QKV_PARAMS = (("attn_norm",), ("attn", "Wqkv"))  # what a layer's Q/K/V depend on, within the layer
  ABOVE_LAYERS = ("final_norm",)                    # top-level params applied after the last layer
  FUSED = {"Wqkv": 3, "Wi": 2}                      # kernels whose output axis stacks equal parts

  def __post_init__(self):
    if self.model_type != MODEL_TYPE:
      raise ValueError(f"model_type {self.model_type!r} is not {MODEL_TYPE!r}")
    if self.hidden_activation not in ACTIVATIONS:
      raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported; supported: "
                       f"{sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} must divide hidden_size "
                       f"{self.hidden_size} into heads of even width (rotary embeddings)")
    if not self.layer_types:
      object.__setattr__(self, "layer_types", every_nth_global(self.num_hidden_layers, 3))
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {FULL, SLIDING}:
      raise ValueError(f"layer_types must name {self.num_hidden_layers} layers, each {FULL!r} or "
                       f"{SLIDING!r}; got {list(self.layer_types)}")
    if self.local_attention < 2:
      raise ValueError(f"local_attention {self.local_attention} must be at least 2")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def max_len(self) -> int:
    return self.max_position_embeddings

  @property
  def global_every(self) -> Optional[int]:
    """n if the layers are global every n-th from the first (transformers' global_attn_every_n_layers),
    else None."""
    for n in range(1, self.num_hidden_layers + 1):
      if self.layer_types == every_nth_global(self.num_hidden_layers, n):
        return n
    return None

  def truncated(self, depth: int) -> "ModernBertConfig":
    """The first `depth` layers."""
    return dataclasses.replace(self, num_hidden_layers=depth, layer_types=self.layer_types[:depth])

  def resized(self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int,
              dropout_rate: float) -> "ModernBertConfig":
    """A student of this family: its own depth and widths, global attention as often as here (every
    n-th layer), the same vocabulary, positions, rotary thetas and window, `dropout_rate` everywhere."""
    n = self.global_every or 3
    return dataclasses.replace(
        self, num_hidden_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, layer_types=every_nth_global(num_layers, n),
        attention_dropout=dropout_rate, embedding_dropout=dropout_rate, mlp_dropout=dropout_rate)

  @classmethod
  def from_dict(cls, d: dict) -> "ModernBertConfig":
    """From an HF config dict (transformers 4's `global_attn_every_n_layers` and rope thetas, or 5's
    `layer_types` and `rope_parameters`); unknown keys are ignored, unsupported choices raise ValueError."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    layers = d.get("num_hidden_layers", cls.num_hidden_layers)
    if not d.get("layer_types"):
      kw["layer_types"] = every_nth_global(layers, d.get("global_attn_every_n_layers") or 3)
    rope = d.get("rope_parameters") or {}
    for kind, key in ((FULL, "global_rope_theta"), (SLIDING, "local_rope_theta")):
      params = rope.get(kind) or {}
      if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {params['rope_type']!r} is not supported; only 'default'")
      if "rope_theta" in params:
        kw[key] = float(params["rope_theta"])
    if d.get("rope_scaling"):
      raise ValueError("rope_scaling is not supported")
    if d.get("head_dim") not in (None, d.get("hidden_size", cls.hidden_size) //
                                 d.get("num_attention_heads", cls.num_attention_heads)):
      raise ValueError(f"head_dim {d['head_dim']} other than hidden_size / num_attention_heads is "
                       "not supported")
    for k in ("attention_dropout", "embedding_dropout", "mlp_dropout", "global_rope_theta",
              "local_rope_theta", "norm_eps"):
      if k in kw:
        kw[k] = float(kw[k])
    return cls(**kw)

  @classmethod
  def from_json_file(cls, path: str) -> "ModernBertConfig":
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["layer_types"] = list(self.layer_types)
    return d

  def to_hf_dict(self) -> dict:
    """An HF config.json that `transformers.AutoModel` loads as `ModernBertModel` (transformers 5;
    the older keys are written too, for transformers 4)."""
    d = self.to_dict()
    d.update(architectures=["ModernBertModel"], initializer_range=0.02, classifier_pooling="mean",
             rope_parameters={FULL: {"rope_type": "default", "rope_theta": self.global_rope_theta},
                              SLIDING: {"rope_type": "default", "rope_theta": self.local_rope_theta}})
    if self.global_every:
      d["global_attn_every_n_layers"] = self.global_every
    return d


def every_nth_global(num_layers: int, n: int) -> Tuple[str, ...]:
  return tuple(FULL if i % n == 0 else SLIDING for i in range(num_layers))


def is_modernbert(config) -> bool:
  return isinstance(config, ModernBertConfig)


# --- Rotary embeddings and attention ----------------------------------------------------------------------

def _cos_sin(t: int, k: int, theta: float):
  """cos and sin of each position's angles, [1, T, 1, K]: pair (i, i + K/2) shares a frequency."""
  inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  freqs_TK = jnp.tile(jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq_K2[None], (1, 2))
  return jnp.cos(freqs_TK)[None, :, None], jnp.sin(freqs_TK)[None, :, None]


def rotate_half(x_BTNK: jax.Array) -> jax.Array:
  """[-x2, x1] for the halves x1, x2 of each head's width, in fp32, as a matmul with the signed
  permutation: exact (one nonzero product per output; a bf16 x is one MXU pass). Slicing and
  concatenating 32-lane halves instead made XLA:TPU write q and k to HBM four more times a layer: the
  ModernBERT recipe's step on a v4-32 took 150 ms by the compiler's estimate, 113 ms this way."""
  k = x_BTNK.shape[-1]
  i = jnp.arange(k)
  perm_KK = ((i[:, None] == (i[None, :] + k // 2) % k) * jnp.where(i[None, :] < k // 2, -1, 1))
  return jnp.einsum("btnk,kj->btnj", x_BTNK, perm_KK.astype(x_BTNK.dtype),
                    precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def rotary(x_BTNK: jax.Array, theta: float) -> jax.Array:
  """x rotated by its position (0..T-1) as transformers' apply_rotary_pos_emb does (the halves of each
  head's width are the pairs), in fp32; returned in x's dtype. [B, T, N, K] -> [B, T, N, K]."""
  cos, sin = _cos_sin(x_BTNK.shape[1], x_BTNK.shape[-1], theta)
  return (x_BTNK.astype(jnp.float32) * cos + rotate_half(x_BTNK) * sin).astype(x_BTNK.dtype)


def _rotary_fwd(x_BTNK, theta):
  return rotary(x_BTNK, theta), None


def _rotary_bwd(theta, _, dy_BTNK):
  # The rotation's transpose, in fp32 and cast once (autodiff of the matmul would round a bf16 gradient
  # twice): rotate_half is antisymmetric and pairs share their sin, so dx = dy cos - rotate_half(dy) sin.
  cos, sin = _cos_sin(dy_BTNK.shape[1], dy_BTNK.shape[-1], theta)
  return ((dy_BTNK.astype(jnp.float32) * cos - rotate_half(dy_BTNK) * sin).astype(dy_BTNK.dtype),)


rotary.defvjp(_rotary_fwd, _rotary_bwd)


def _attend(q_BNCK, k_BNSK, v_BNSK, allowed_BNCS, drop):
  """softmax(q kᵀ/√K + mask) v for one block of queries; fp32 softmax; `drop(probs)` for dropout."""
  scores = jnp.einsum("bnck,bnsk->bncs", q_BNCK * (1.0 / math.sqrt(q_BNCK.shape[-1])),
                      k_BNSK).astype(jnp.float32)
  scores = jnp.where(allowed_BNCS, scores, jnp.finfo(jnp.float32).min)
  probs = drop(jax.nn.softmax(scores, axis=-1).astype(q_BNCK.dtype))
  return jnp.einsum("bncs,bnsk->bnck", probs, v_BNSK)


def attention(q_BTD, k_BTD, v_BTD, mask_BT, num_heads: int, window: Optional[int] = None,
              rate: float = 0.0, rng=None, chunk: Optional[int] = None) -> jax.Array:
  """Bidirectional attention over non-padded keys, within ±window positions when `window` is set.
  q, k, v: [B, T, D] (rotated already); returns the context [B, T, D]. Dropout on the probabilities
  with `rate` when `rng` is given. Above `chunk` (default ATTENTION_CHUNK) tokens: query chunks of
  `chunk // 2`, checkpointed, and a local layer reads only the keys in reach of each chunk."""
  chunk = chunk or ATTENTION_CHUNK
  b, t, d = q_BTD.shape
  heads = lambda x: x.reshape(b, -1, num_heads, d // num_heads).transpose(0, 2, 1, 3)
  q, k, v = heads(q_BTD), heads(k_BTD), heads(v_BTD)
  key_ok_BS = mask_BT > 0
  drop_with = lambda key: (lambda p: p) if rng is None or rate == 0.0 else \
      (lambda p: dropout(p, rate, key))
  if t <= chunk:
    pos = jnp.arange(t)
    allowed = key_ok_BS[:, None, None, :]
    if window is not None:
      allowed = allowed & (jnp.abs(pos[:, None] - pos[None, :]) <= window)[None, None]
    ctx = _attend(q, k, v, allowed, drop_with(rng))
    return ctx.transpose(0, 2, 1, 3).reshape(b, t, d)

  c = chunk // 2
  n = -(-t // c)
  pad = n * c - t
  q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
  if window is None:
    reach, lead = t, 0
    k_all, v_all, ok_all = k, v, key_ok_BS
  else:  # keys [start − w, start + c + w) of each chunk: pad w on the left and enough on the right
    reach, lead = c + 2 * window, window
    padk = lambda x: jnp.pad(x, ((0, 0), (0, 0), (window, window + pad), (0, 0)))
    k_all, v_all = padk(k), padk(v)
    ok_all = jnp.pad(key_ok_BS, ((0, 0), (window, window + pad)))

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def one_chunk(i):
    start = i * c
    q_c = jax.lax.dynamic_slice_in_dim(q, start, c, axis=2)
    if window is None:
      k_c, v_c, ok_c, kpos = k_all, v_all, ok_all, jnp.arange(t)
    else:
      k_c = jax.lax.dynamic_slice_in_dim(k_all, start, reach, axis=2)
      v_c = jax.lax.dynamic_slice_in_dim(v_all, start, reach, axis=2)
      ok_c = jax.lax.dynamic_slice_in_dim(ok_all, start, reach, axis=1)
      kpos = start - lead + jnp.arange(reach)
    qpos = start + jnp.arange(c)
    allowed = ok_c[:, None, None, :]
    if window is not None:
      allowed = allowed & (jnp.abs(qpos[:, None] - kpos[None, :]) <= window)[None, None]
    return _attend(q_c, k_c, v_c, allowed, drop_with(None if rng is None else jax.random.fold_in(rng, i)))

  ctx_nBNCK = jax.lax.map(one_chunk, jnp.arange(n))
  ctx = jnp.moveaxis(ctx_nBNCK, 0, 2).reshape(b, num_heads, n * c, d // num_heads)[:, :, :t]
  return ctx.transpose(0, 2, 1, 3).reshape(b, t, d)


# --- The encoder ---------------------------------------------------------------------------------------

def _linear(features, use_bias, dtype, param_dtype, name, std=0.02, splits=1):
  init = nn.initializers.truncated_normal(stddev=std, lower=-2.0, upper=2.0)  # HF's cutoff: 2 std
  return layers.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=init,
                      name=name, splits=splits)


def _norm(c: ModernBertConfig, dtype, param_dtype, name):
  return nn.LayerNorm(epsilon=c.norm_eps, use_bias=c.norm_bias, dtype=dtype, param_dtype=param_dtype,
                      name=name)


class _Attention(nn.Module):
  config: ModernBertConfig
  layer: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: Any = None

  @nn.compact
  def __call__(self, x_BTH, mask_BT, deterministic, qkv_only=False):
    c = self.config
    b, t, h = x_BTH.shape
    out_std = 0.02 / math.sqrt(2.0 * c.num_hidden_layers)
    q, k, v = _linear(3 * h, c.attention_bias, self.dtype, self.param_dtype, "Wqkv", splits=3)(x_BTH)
    local = c.layer_types[self.layer] == SLIDING
    theta = c.local_rope_theta if local else c.global_rope_theta
    rot = lambda x: rotary(x.reshape(b, t, c.num_attention_heads, c.head_dim), theta).reshape(b, t, h)
    q, k = rot(q), rot(k)
    if qkv_only:
      return None, (q, k, v)
    rng = None if deterministic or c.attention_dropout == 0.0 else self.make_rng("dropout")
    window = c.local_attention // 2 if local else None
    impl = self.attention_implementation
    if callable(impl):  # the trainer's TPU kernel: windows and its own dropout mask
      rate = 0.0 if rng is None else c.attention_dropout
      ctx = fused_attention(q, k, v, mask_BT, c.num_attention_heads, impl, window, rate, rng)
    elif impl is not None and rng is None:
      ctx = fused_attention(q, k, v, mask_BT, c.num_attention_heads, impl, window)
    else:
      ctx = attention(q, k, v, mask_BT, c.num_attention_heads, window, c.attention_dropout, rng)
    y = _linear(h, c.attention_bias, self.dtype, self.param_dtype, "Wo", out_std)(ctx)
    if not deterministic and c.attention_dropout > 0.0:
      y = dropout(y, c.attention_dropout, self.make_rng("dropout"))
    return y, (q, k, v)


class _MLP(nn.Module):
  config: ModernBertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTH, deterministic):
    c = self.config
    i = c.intermediate_size
    hg = _linear(2 * i, c.mlp_bias, self.dtype, self.param_dtype, "Wi")(x_BTH)
    y = ACTIVATIONS[c.hidden_activation](hg[..., :i]) * hg[..., i:]
    if not deterministic and c.mlp_dropout > 0.0:
      y = dropout(y, c.mlp_dropout, self.make_rng("dropout"))
    out_std = 0.02 / math.sqrt(2.0 * c.num_hidden_layers)
    return _linear(c.hidden_size, c.mlp_bias, self.dtype, self.param_dtype, "Wo", out_std)(y)


class _Layer(nn.Module):
  config: ModernBertConfig
  layer: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: Any = None

  @nn.compact
  def __call__(self, x_BTH, mask_BT, deterministic, qkv_only=False):
    c, dt, pdt = self.config, self.dtype, self.param_dtype
    h = x_BTH if self.layer == 0 else _norm(c, dt, pdt, "attn_norm")(x_BTH)  # layer 0: identity
    a, qkv = _Attention(c, self.layer, dt, pdt, self.attention_implementation, name="attn")(
        h, mask_BT, deterministic, qkv_only)
    if qkv_only:
      return None, qkv
    x_BTH = x_BTH + a
    return x_BTH + _MLP(c, dt, pdt, name="mlp")(_norm(c, dt, pdt, "mlp_norm")(x_BTH), deterministic), qkv


class _Layers(nn.Module):
  """HF's `layers`: layers named "0", "1", ..."""
  config: ModernBertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: Any = None

  @nn.compact
  def __call__(self, x_BTH, mask_BT, deterministic, capture_layer, stop_at_capture):
    qkv = captured = None
    for i in range(self.config.num_hidden_layers):
      stop = stop_at_capture and i == capture_layer
      y_BTH, layer_qkv = _Layer(self.config, i, self.dtype, self.param_dtype,
                                self.attention_implementation, name=str(i))(
          x_BTH, mask_BT, deterministic, qkv_only=stop)
      if i == capture_layer:
        qkv, captured = layer_qkv, y_BTH
      if stop:
        return None, qkv, None
      x_BTH = y_BTH
    return x_BTH, qkv, captured


class ModernBertEncoder(nn.Module):
  """ModernBERT without heads, with BertEncoder's interface (model.py): `dtype` computes, `param_dtype`
  stores.

  apply({"params": p}, input_ids [B,T], attention_mask [B,T] (1 = token; None = all), token_type_ids
        (ignored: ModernBERT has none), capture_layer=-1, deterministic=True, stop_at_capture=False)
  -> EncoderOutput(last_hidden_state [B,T,H] (after final_norm) or None, qkv=(q, k, v) of the captured
     layer, each [B,T,H], q and k rotated, layer_output [B,T,H] or None).
  layer_output is the captured layer's output read out as the model reads its last one, through
  final_norm (so it equals last_hidden_state for the last layer): what a student's last_hidden_state
  is compared with.
  """
  config: ModernBertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: Any = None  # as BertEncoder's

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, capture_layer=-1,
               deterministic=True, stop_at_capture=False):
    c = self.config
    n = c.num_hidden_layers
    if not -n <= capture_layer < n:
      raise ValueError(f"capture_layer {capture_layer} is out of range for {n} layers")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x = _Embeddings(c, self.dtype, self.param_dtype, name="embeddings")(input_ids, deterministic)
    h, qkv, captured = _Layers(c, self.dtype, self.param_dtype, self.attention_implementation,
                               name="layers")(
        x, attention_mask, deterministic, capture_layer % n, stop_at_capture)
    if h is None:
      return EncoderOutput(last_hidden_state=None, qkv=qkv, layer_output=None)
    final = _norm(c, self.dtype, self.param_dtype, "final_norm")
    return EncoderOutput(last_hidden_state=final(h), qkv=qkv, layer_output=final(captured))

  def init_params(self, rng, seq_len: int = 8):
    """Random params (transformers' init: truncated normals of std 0.02, 0.02/√(2L) for the output
    projections, unit LayerNorms)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return self.init(rng, ids)["params"]


class _Embeddings(nn.Module):
  """HF's `embeddings`: tok_embeddings, then norm and dropout (no position embeddings: rotary)."""
  config: ModernBertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, deterministic):
    c = self.config
    x = layers.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=nn.initializers.truncated_normal(0.02, lower=-2.0, upper=2.0),
                 name="tok_embeddings")(input_ids)
    x = _norm(c, self.dtype, self.param_dtype, "norm")(x)
    if not deterministic and c.embedding_dropout > 0.0:
      x = dropout(x, c.embedding_dropout, self.make_rng("dropout"))
    return x
