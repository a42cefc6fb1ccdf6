"""A BERT encoder in flax.linen that computes what Hugging Face's PyTorch `BertModel` computes.

The parameter tree follows Hugging Face's Flax BERT key names
(`embeddings/word_embeddings/embedding`, `encoder/layer/0/attention/self/query/kernel`, ...), so params
drop into existing Flax code. `apply` also returns the Q/K/V projections of one layer, which is what
MiniLM distils, and can stop right after them (a teacher needs nothing above the distilled layer).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from minilm_jax import dropout_hash, layers

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu(x):
  """BERT's GELU, x·Φ(x) = x·(1 + erf(x/√2))/2 (the formula PyTorch's exact GELU uses), in x's dtype as
  flax's was. Its derivative Φ(x) + x·φ(x) is written out (_gelu_bwd): left to autodiff, XLA:TPU
  materialises the erf's pieces in the backward, and the step took 1.2 ms more of 16.3 (v4-32, BERT-base
  -> 6x384, batch 1024 x 128, by the compiler's estimate). (Upcasting the forward to fp32 costs more
  than it saves there: 17.5 ms, the fp32 activations reach memory.)"""
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _gelu_fwd(x):
  return gelu(x), x  # only x is kept: Φ is recomputed in the backward's one elementwise pass


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  d = 0.5 * (1 + jax.lax.erf(xf * _SQRT_HALF)) + xf * _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
  return ((g.astype(jnp.float32) * d).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# Families whose weights share BERT's layout. RoBERTa/XLM-R differ only in how position ids are made.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
ACTIVATIONS = {
    "gelu": gelu,  # BERT's GELU is the exact erf form.
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of Hugging Face's BertConfig that change the computation."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  model_type: str = "bert"

  # Where the trainer finds things in the param tree (student.py); ModernBertConfig has its own.
  LAYERS = ("encoder", "layer")        # the layers' subtree: LAYERS + (str(i),)
  QKV_PARAMS = (("attention", "self"),)  # what a layer's Q/K/V depend on, within the layer
  ABOVE_LAYERS = ()                    # top-level params applied after the last layer
  FUSED = {}                           # kernels whose output axis stacks equal parts (none here)

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} does not divide "
                       f"hidden_size {self.hidden_size}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def max_len(self) -> int:
    """Longest sequence the position table allows (RoBERTa reserves pad_token_id + 1 rows)."""
    if self.model_type == "bert":
      return self.max_position_embeddings
    return self.max_position_embeddings - self.pad_token_id - 1

  def truncated(self, depth: int) -> "BertConfig":
    """The first `depth` layers."""
    return dataclasses.replace(self, num_hidden_layers=depth)

  def resized(self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int,
              dropout_rate: float) -> "BertConfig":
    """A student of this family: its own depth and widths, the same vocabulary and positions."""
    return dataclasses.replace(
        self, num_hidden_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, hidden_dropout_prob=dropout_rate,
        attention_probs_dropout_prob=dropout_rate)

  @classmethod
  def from_dict(cls, d: dict) -> "BertConfig":
    """From an HF config dict; unknown keys are ignored, unsupported choices raise ValueError."""
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"position_embedding_type {d['position_embedding_type']!r} is not supported; "
                       "only 'absolute'")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def from_json_file(cls, path: str) -> "BertConfig":
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
      return cls.from_dict(d)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: {e}") from None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_hf_dict(self) -> dict:
    """An HF config.json that `transformers.AutoModel` / `BertModel` reads."""
    arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
    return {"architectures": [arch[self.model_type]], **self.to_dict(),
            "position_embedding_type": "absolute", "initializer_range": 0.02}


@flax.struct.dataclass
class EncoderOutput:
  """last_hidden_state: [B, T, H] (None when the encoder stopped at the captured Q/K/V).
  qkv: (q_BTD, k_BTD, v_BTD) of the captured layer, heads not yet split, biases included.
  layer_output: [B, T, H], the captured layer's output (None when the encoder stopped at its Q/K/V)."""
  last_hidden_state: Optional[jax.Array]
  qkv: Tuple[jax.Array, jax.Array, jax.Array]
  layer_output: Optional[jax.Array] = None


_init = nn.initializers.normal(stddev=0.02)  # HF's initializer_range.


def _dense(features, cfg_dtype, param_dtype, name):
  return layers.Dense(features, dtype=cfg_dtype, param_dtype=param_dtype, kernel_init=_init, name=name)


def _layer_norm(config, dtype, param_dtype, name):
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


def _threefry2x32(k0, k1, x0, x1):
  """Threefry-2x32, 20 rounds: the hash behind jax.random's default PRNG, written out. JAX lowers its
  own on CPU as a 5-step while loop over whole arrays (each step a pass through memory, on one core);
  written out, XLA fuses it into the dropout that uses it, one pass over the elements."""
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r)))
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


def _fused_bits_apply(key) -> bool:
  """Whether `dropout` can draw its bits with _threefry2x32: the key is jax.random's default
  (partitionable) threefry, so the bits equal jax.random.bits'."""
  return (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and str(jax.random.key_impl(key)) == "threefry2x32"
          and jax.config.jax_threefry_partitionable)


def dropout(x, rate: float, key):
  """Dropout drawing 16 random bits per element, the rate exact to 1/65536.

  On CPU each 32-bit word of jax.random.bits(key, x.shape[:-1] + (⌈last/2⌉,), uint32) masks two
  neighbouring elements (its low half the first); with the default threefry key the words are hashed
  inside the fusion that applies the mask (_threefry2x32, one hash per word), with the same bits as
  jax.random.bits: ~9× cheaper on CPU than materialising them. Elsewhere (TPU, GPU) each element takes
  its own 16 bits of a cheaper counter hash (_hash_bits16), which XLA fuses into the mask there, where
  the word layout above makes XLA:TPU write the words to HBM (4× the step's bytes for the attention's
  dropout, by its cost model). So a mask is a function of (key, shape) on each platform, not across
  them."""
  threshold = round(rate * 65536)
  keep_prob = 1.0 - threshold / 65536
  apply = lambda u16: jnp.where(u16 >= threshold, x / keep_prob, 0).astype(x.dtype)
  return jax.lax.platform_dependent(key, cpu=lambda k: apply(_cpu_bits16(k, x.shape)),
                                    default=lambda k: apply(_hash_bits16(k, x.shape)))


def _hash_bits16(key, shape):
  """16 random bits per element of `shape` (int32 in [0, 65536)) for TPU and GPU: the low half of
  dropout_hash.hash32 (two rounds of murmur3's fmix32, the attention kernel's hash) of the element's
  flat index, keyed by one 32-bit draw of `key`. About 20 vector ops an element, where jax.random.bits'
  threefry (20 rounds) takes over 100, recomputed again in the backward pass: v5e-16, BERT-base ->
  6x384, batch 1024 x 128, 19.1 -> 18.9 ms a step by the compiler's estimate. Arrays of 2^31 elements or
  more (the index would wrap) take jax.random.bits."""
  n = math.prod(shape)
  if n >= 2 ** 31:
    return jax.random.bits(key, shape, jnp.uint16)
  seed = jax.lax.bitcast_convert_type(jax.random.bits(key, (), jnp.uint32), jnp.int32)
  counter = jax.lax.iota(jnp.int32, n).reshape(shape)
  return dropout_hash.hash32(dropout_hash.fmix32(seed), counter) & 0xFFFF


def _cpu_bits16(key, shape):
  """16 random bits per element of `shape`, two to a 32-bit word of jax.random.bits (see dropout)."""
  last = shape[-1]
  words_shape = shape[:-1] + (-(-last // 2),)
  n_words = math.prod(words_shape)
  if last % 2 == 0 and n_words < 2 ** 32 and _fused_bits_apply(key):
    k = jax.random.key_data(key)
    # Counter of word w is (0, w), as jax.random.bits numbers them; an explicit pair axis keeps one
    # hash per word inside the fusion.
    counter = jax.lax.iota(jnp.uint32, n_words).reshape(*words_shape, 1)
    x0, x1 = _threefry2x32(k[0], k[1], jnp.zeros_like(counter), counter)
    half = jax.lax.broadcasted_iota(jnp.uint32, (1,) * len(words_shape) + (2,), len(words_shape))
    return (((x0 ^ x1) >> (half * jnp.uint32(16))) & jnp.uint32(0xFFFF)).reshape(shape)
  words = jax.random.bits(key, words_shape, jnp.uint32)
  return jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*shape[:-1], -1)[..., :last]


class Dropout(nn.Module):
  """`dropout` as a module, its key from the "dropout" RNG stream."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))


def position_ids(config: BertConfig, input_ids_BT: jax.Array) -> jax.Array:
  """[B, T] position ids as HF makes them: 0..T-1 for BERT; for RoBERTa, counted over non-pad tokens
  and offset by pad_token_id + 1 (pads get pad_token_id)."""
  if config.model_type == "bert":
    return jnp.broadcast_to(jnp.arange(input_ids_BT.shape[1]), input_ids_BT.shape)
  not_pad = (input_ids_BT != config.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id


class Embeddings(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BT, token_type_ids_BT, deterministic):
    """token_type_ids_BT None: all type 0. Only the words are gathered: BERT's positions and a batch's
    token types come as broadcasts and a one-hot matmul, whose gradients are sums (layers.py)."""
    c = self.config
    embed = lambda n, name: layers.Embed(n, c.hidden_size, embedding_init=_init, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    positions, types = embed(c.max_position_embeddings, "position_embeddings"), \
        embed(c.type_vocab_size, "token_type_embeddings")
    x_BTH = embed(c.vocab_size, "word_embeddings")(input_ids_BT)
    x_BTH = x_BTH + (positions.first_rows(input_ids_BT.shape) if c.model_type == "bert"
                     else positions(position_ids(c, input_ids_BT)))
    x_BTH = x_BTH + (types.row(0, input_ids_BT.shape) if token_type_ids_BT is None
                     else types.one_hot(token_type_ids_BT))
    x_BTH = _layer_norm(c, self.dtype, self.param_dtype, "LayerNorm")(x_BTH)
    return Dropout(c.hidden_dropout_prob)(x_BTH, deterministic=deterministic)


class SelfAttentionQKV(nn.Module):
  """The query/key/value projections (HF's `attention/self`)."""
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTH):
    h = self.config.hidden_size
    return tuple(_dense(h, self.dtype, self.param_dtype, n)(x_BTH) for n in ("query", "key", "value"))


def attention(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, dropout=None):
  """Multi-head attention over all keys except padding. Returns the context [B, T, D].

  `dropout(probs)` is applied to the attention probabilities (training). Heads go to a heads-major
  layout before the batched matmuls: XLA:CPU runs them ~3x faster than with the head axis in the middle.
  """
  b, t, d = q_BTD.shape
  k_dim = d // num_heads
  to_heads = lambda x: x.reshape(b, t, num_heads, k_dim).transpose(0, 2, 1, 3)
  scores_BNTS = jnp.einsum("bntk,bnsk->bnts", to_heads(q_BTD) * (1.0 / math.sqrt(k_dim)),
                           to_heads(k_BTD)).astype(jnp.float32)
  # Softmax in fp32 even under bf16 compute. Adding dtype-min to masked keys, as HF does.
  bias_B11S = jnp.where(mask_BT > 0, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
  probs_BNTS = jax.nn.softmax(scores_BNTS + bias_B11S, axis=-1).astype(q_BTD.dtype)
  if dropout is not None:
    probs_BNTS = dropout(probs_BNTS)
  ctx_BNTK = jnp.einsum("bnts,bnsk->bntk", probs_BNTS, to_heads(v_BTD))
  return ctx_BNTK.transpose(0, 2, 1, 3).reshape(b, t, d)


def fused_attention(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, implementation,
                    window: Optional[int] = None, rate: float = 0.0, key=None):
  """`attention` through jax.nn.dot_product_attention ("cudnn": cuDNN's fused kernel on GPU; "xla": the
  same call on any backend, which the tests compare with `attention`), or through `implementation` itself
  when it is a function attend(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, window=, rate=, key=) (the
  trainer's on TPU: attention_kernel.attention per device, which alone applies dropout `rate` to the
  probabilities, its mask drawn from `key`). Padding is given as sequence lengths, not a dense mask, so
  rows must be right-padded (the trainer's packed rows are); `window`: ±window keys."""
  if callable(implementation):
    return implementation(q_BTD, k_BTD, v_BTD, mask_BT, num_heads, window=window, rate=rate, key=key)
  if rate:
    raise ValueError(f"implementation {implementation!r} has no dropout on the probabilities")
  b, t, d = q_BTD.shape
  split = lambda x: x.reshape(b, t, num_heads, d // num_heads)
  lengths_B = jnp.sum(mask_BT > 0, axis=-1).astype(jnp.int32)
  ctx = jax.nn.dot_product_attention(split(q_BTD), split(k_BTD), split(v_BTD),
                                     query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
                                     local_window_size=None if window is None else (window, window),
                                     implementation=implementation)
  return ctx.reshape(b, t, d)


class AddNorm(nn.Module):
  """Dense, dropout, residual, LayerNorm (HF's `attention/output` and `output`)."""
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BTX, residual_BTH, deterministic):
    c = self.config
    y_BTH = _dense(c.hidden_size, self.dtype, self.param_dtype, "dense")(h_BTX)
    y_BTH = Dropout(c.hidden_dropout_prob)(y_BTH, deterministic=deterministic)
    return _layer_norm(c, self.dtype, self.param_dtype, "LayerNorm")(y_BTH + residual_BTH)


class Attention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: Any = None  # see BertEncoder

  @nn.compact
  def __call__(self, x_BTH, mask_BT, deterministic, qkv_only=False):
    c = self.config
    qkv = SelfAttentionQKV(c, self.dtype, self.param_dtype, name="self")(x_BTH)
    if qkv_only:
      return None, qkv
    drop = Dropout(c.attention_probs_dropout_prob)
    rate = 0.0 if deterministic else c.attention_probs_dropout_prob
    impl = self.attention_implementation
    if callable(impl) and rate:  # a kernel that draws its own dropout mask
      ctx_BTH = fused_attention(*qkv, mask_BT, c.num_attention_heads, impl, rate=rate,
                                key=self.make_rng("dropout"))
    elif impl is not None and not rate:
      ctx_BTH = fused_attention(*qkv, mask_BT, c.num_attention_heads, impl)
    else:
      ctx_BTH = attention(*qkv, mask_BT, c.num_attention_heads,
                          lambda p: drop(p, deterministic=deterministic))
    return AddNorm(c, self.dtype, self.param_dtype, name="output")(ctx_BTH, x_BTH, deterministic), qkv


class Layer(nn.Module):
  """One transformer block (HF's BertLayer). With `qkv_only` it stops after the Q/K/V projections."""
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: Any = None

  @nn.compact
  def __call__(self, x_BTH, mask_BT, deterministic, qkv_only=False):
    c, dt, pdt = self.config, self.dtype, self.param_dtype
    a_BTH, qkv = Attention(c, dt, pdt, self.attention_implementation, name="attention")(
        x_BTH, mask_BT, deterministic, qkv_only)
    if qkv_only:
      return None, qkv
    h_BTF = _Intermediate(c, dt, pdt, name="intermediate")(a_BTH)
    return AddNorm(c, dt, pdt, name="output")(h_BTF, a_BTH, deterministic), qkv


class _Intermediate(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTH):
    c = self.config
    return ACTIVATIONS[c.hidden_act](_dense(c.intermediate_size, self.dtype, self.param_dtype, "dense")(x_BTH))


class _LayerCollection(nn.Module):
  """HF's `encoder/layer`: layers named "0", "1", ..."""
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: Any = None

  @nn.compact
  def __call__(self, x_BTH, mask_BT, deterministic, capture_layer, stop_at_capture):
    qkv = captured_BTH = None
    for i in range(self.config.num_hidden_layers):
      stop = stop_at_capture and i == capture_layer
      y_BTH, layer_qkv = Layer(self.config, self.dtype, self.param_dtype, self.attention_implementation,
                               name=str(i))(x_BTH, mask_BT, deterministic, qkv_only=stop)
      if i == capture_layer:
        qkv, captured_BTH = layer_qkv, y_BTH
      if stop:
        return None, qkv, None
      x_BTH = y_BTH
    return x_BTH, qkv, captured_BTH


class _Encoder(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: Any = None

  @nn.compact
  def __call__(self, *args):
    return _LayerCollection(self.config, self.dtype, self.param_dtype, self.attention_implementation,
                            name="layer")(*args)


class BertEncoder(nn.Module):
  """BERT without heads or pooler. `dtype` is the compute dtype, `param_dtype` the storage dtype.

  apply({"params": p}, input_ids [B,T], attention_mask [B,T] (1 = token, 0 = pad; None = all tokens),
        token_type_ids [B,T] (None = zeros), capture_layer=-1 (Python index, negative allowed),
        deterministic=True (False enables dropout; pass rngs={"dropout": key}),
        stop_at_capture=False (True: return right after the captured layer's Q/K/V projections))
  -> EncoderOutput(last_hidden_state [B,T,H] or None, qkv=(q, k, v) each [B,T,H],
                   layer_output [B,T,H] or None: the captured layer's output).
  """
  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # None: the reference attention (attention()); "cudnn" (or "xla", or a function, see fused_attention):
  # fused_attention() wherever no dropout applies to the probabilities. Needs right-padded rows.
  attention_implementation: Any = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, capture_layer=-1,
               deterministic=True, stop_at_capture=False):
    c = self.config
    n = c.num_hidden_layers
    if not -n <= capture_layer < n:
      raise ValueError(f"capture_layer {capture_layer} is out of range for {n} layers")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x_BTH = Embeddings(c, self.dtype, self.param_dtype, name="embeddings")(
        input_ids, token_type_ids, deterministic)
    h_BTH, qkv, captured_BTH = _Encoder(c, self.dtype, self.param_dtype, self.attention_implementation,
                                        name="encoder")(
        x_BTH, attention_mask, deterministic, capture_layer % n, stop_at_capture)
    return EncoderOutput(last_hidden_state=h_BTH, qkv=qkv, layer_output=captured_BTH)

  def init_params(self, rng, seq_len: int = 8):
    """Random params (HF's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return self.init(rng, ids)["params"]
