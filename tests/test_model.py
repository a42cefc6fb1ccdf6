"""Parity of the Flax encoder with transformers' PyTorch BertModel/RobertaModel (fp32, 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minilm_jax
from minilm_jax.model import BertConfig, BertEncoder
from conftest import make_hf_model, random_batch

torch = pytest.importorskip("torch")
ATOL = 1e-4


def torch_outputs(model, ids, mask, token_types=None):
  """last_hidden_state and the q/k/v of every layer, captured with forward hooks."""
  captured = []
  hooks = []
  for layer in model.encoder.layer:
    s = layer.attention.self
    trio = {}
    captured.append(trio)
    for n in ("query", "key", "value"):
      hooks.append(getattr(s, n).register_forward_hook(
          lambda mod, inp, out, n=n, trio=trio: trio.__setitem__(n, out.detach().numpy())))
  kw = {} if token_types is None else {"token_type_ids": torch.tensor(token_types)}
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                **kw)
  for h in hooks:
    h.remove()
  torch_outputs.hidden_states = [h.numpy() for h in out.hidden_states]  # [embeddings, layer 0, ...]
  return out.last_hidden_state.numpy(), [(c["query"], c["key"], c["value"]) for c in captured]


def assert_parity(folder, torch_model, ids, mask, token_types=None):
  config, params = minilm_jax.load_pretrained(folder)
  model = BertEncoder(config)
  want_h, want_qkv = torch_outputs(torch_model, ids, mask, token_types)
  tt = None if token_types is None else jnp.asarray(token_types)
  valid = mask[..., None] > 0  # Padded positions are garbage in both; compare real tokens.
  for layer in range(config.num_hidden_layers):
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), tt, capture_layer=layer)
    for got, want in zip(out.qkv, want_qkv[layer]):
      np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=ATOL, rtol=0)
    # The captured layer's output (what the "hidden" loss term reads from the teacher).
    np.testing.assert_allclose(np.where(valid, out.layer_output, 0),
                               np.where(valid, torch_outputs.hidden_states[layer + 1], 0), atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.where(valid, out.last_hidden_state, 0), np.where(valid, want_h, 0),
                             atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_real_checkpoint_parity(real_teacher, padding):
  import transformers
  tm = transformers.BertModel.from_pretrained(real_teacher).eval()
  ids, mask = random_batch(np.random.default_rng(0), 3, 17, 30522, padding, low=1000)
  ids[:, 0] = 101
  assert_parity(real_teacher, tm, ids, mask)


@pytest.mark.parametrize("shape", [
    dict(num_attention_heads=4, intermediate_size=100, type_vocab_size=2),
    dict(num_attention_heads=3, intermediate_size=64, type_vocab_size=3, hidden_size=36),
    dict(num_attention_heads=6, intermediate_size=200, type_vocab_size=1, num_hidden_layers=2),
])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_random_bert_parity(tmp_path, shape, padding):
  tm = make_hf_model(tmp_path, **shape)
  rng = np.random.default_rng(1)
  ids, mask = random_batch(rng, 4, 11, 99, padding)
  types = rng.integers(0, shape["type_vocab_size"], size=ids.shape)
  assert_parity(str(tmp_path), tm, ids, mask, types)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_random_roberta_parity(tmp_path, padding):
  tm = make_hf_model(tmp_path, "roberta", type_vocab_size=1, max_position_embeddings=40)
  ids, mask = random_batch(np.random.default_rng(2), 4, 13, 99, padding, pad_id=1, low=3)
  assert_parity(str(tmp_path), tm, ids, mask)


def test_stop_at_capture_gives_same_qkv_and_no_hidden_state():
  config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16)
  model = BertEncoder(config)
  params = model.init_params(jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 50)
  full = model.apply({"params": params}, ids, capture_layer=2)
  stopped = model.apply({"params": params}, ids, capture_layer=2, stop_at_capture=True)
  assert stopped.last_hidden_state is None
  for a, b in zip(full.qkv, stopped.qkv):
    np.testing.assert_array_equal(a, b)
  # Stopping at layer 2 must not even trace layers above it.
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, capture_layer=1,
                                                   stop_at_capture=True))(params))
  # Layer 0 in full (q, k, v, scores, context, attention output, FFN in and out) + layer 1's q, k, v.
  assert jaxpr.count("dot_general") == 8 + 3


def test_param_tree_uses_hf_flax_names():
  config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16)
  p = BertEncoder(config).init_params(jax.random.key(0))
  assert p["embeddings"]["word_embeddings"]["embedding"].shape == (50, 32)
  assert p["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"].shape == (32, 32)
  assert p["encoder"]["layer"]["0"]["attention"]["output"]["LayerNorm"]["scale"].shape == (32,)
  assert p["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"].shape == (32, 64)
  assert p["encoder"]["layer"]["0"]["output"]["dense"]["kernel"].shape == (64, 32)


def test_gelu_is_exact_erf():
  from minilm_jax.model import ACTIVATIONS
  x = np.linspace(-4, 4, 101).astype(np.float32)
  from scipy.special import erf  # noqa: independent oracle
  np.testing.assert_allclose(ACTIVATIONS["gelu"](x), 0.5 * x * (1 + erf(x / np.sqrt(2))), atol=1e-6)


def test_gelu_derivative_is_exact():
  """gelu's written-out derivative against Φ(x) + x·φ(x) in float64, and the chain rule's g."""
  from scipy.special import erf  # noqa: independent oracle
  from minilm_jax.model import gelu
  x = np.linspace(-6, 6, 241).astype(np.float32)
  g = np.cos(x).astype(np.float32)
  x64 = x.astype(np.float64)
  want = g * (0.5 * (1 + erf(x64 / np.sqrt(2))) + x64 * np.exp(-x64 ** 2 / 2) / np.sqrt(2 * np.pi))
  _, vjp = jax.vjp(gelu, jnp.asarray(x))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], want, atol=1e-6, rtol=1e-5)



def test_dropout_only_when_not_deterministic():
  config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16)
  model = BertEncoder(config)
  params = model.init_params(jax.random.key(0))
  ids = jnp.arange(16).reshape(2, 8)
  a = model.apply({"params": params}, ids).last_hidden_state
  b = model.apply({"params": params}, ids).last_hidden_state
  c = model.apply({"params": params}, ids, deterministic=False,
                  rngs={"dropout": jax.random.key(3)}).last_hidden_state
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_dropout_bits_are_jax_random_bits():
  """The hashed-in-place dropout masks exactly as jax.random.bits' words would (low half first), so
  runs and resumes keep the masks they had; odd widths and other key kinds take jax.random.bits."""
  from minilm_jax.model import dropout

  def reference(x, rate, key):
    threshold = round(rate * 65536)
    words = jax.random.bits(key, x.shape[:-1] + (-(-x.shape[-1] // 2),), jnp.uint32)
    u16 = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*x.shape[:-1], -1)[..., :x.shape[-1]]
    return jnp.where(u16 >= threshold, x / (1.0 - threshold / 65536), 0).astype(x.dtype)

  for shape in [(2, 3, 16, 16), (4, 8, 6), (3, 5, 7), (9,)]:
    for dtype in (jnp.float32, jnp.bfloat16):
      x = jax.random.normal(jax.random.key(1), shape).astype(dtype)
      key = jax.random.fold_in(jax.random.key(5), 2)
      got = jax.jit(lambda x, k: dropout(x, 0.1, k))(x, key)
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(reference(x, 0.1, key), np.float32))
  x = jnp.ones((64, 64))
  kept = float((jax.jit(lambda x, k: dropout(x, 0.25, k))(x, jax.random.key(0)) != 0).mean())
  assert abs(kept - 0.75) < 0.03
  rbg = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(dropout(x, 0.1, rbg), reference(x, 0.1, rbg))


def test_tpu_and_gpu_dropout_bits_are_the_counter_hash_of_each_element():
  """The TPU/GPU mask bits (model._hash_bits16) against murmur3's fmix32 written in numpy uint32: two
  rounds over each element's flat index, keyed by one 32-bit draw of the key; their rate and spread."""
  from minilm_jax.model import _hash_bits16

  def fmix32(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))

  key = jax.random.key(7)
  shape = (3, 5, 64)
  with np.errstate(over="ignore"):
    k = fmix32(np.asarray(jax.random.bits(key, (), jnp.uint32), np.uint32))
    counter = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
    want = (fmix32(fmix32(counter ^ k) + k) & np.uint32(0xFFFF)).astype(np.int64)
  got = np.asarray(jax.jit(_hash_bits16, static_argnums=1)(key, shape))
  np.testing.assert_array_equal(got, want)
  bits = np.asarray(jax.jit(_hash_bits16, static_argnums=1)(jax.random.key(0), (256, 1024)))
  dropped = (bits < round(0.1 * 65536)).mean()
  assert abs(dropped - 0.1) < 4 * (0.1 * 0.9 / bits.size) ** 0.5  # within 4 standard errors
  assert abs(bits.mean() / 65535 - 0.5) < 0.005
  other = np.asarray(jax.jit(_hash_bits16, static_argnums=1)(jax.random.key(1), (256, 1024)))
  assert (other == bits).mean() < 0.001  # another key, another mask


def test_token_type_ids_default_to_zeros_and_bf16_compute():
  config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16)
  params = BertEncoder(config).init_params(jax.random.key(0))
  ids = jnp.arange(16).reshape(2, 8)
  a = BertEncoder(config).apply({"params": params}, ids).last_hidden_state
  b = BertEncoder(config).apply({"params": params}, ids, None, jnp.zeros_like(ids)).last_hidden_state
  np.testing.assert_array_equal(a, b)
  bf = BertEncoder(config, dtype=jnp.bfloat16).apply({"params": params}, ids)
  assert bf.last_hidden_state.dtype == jnp.bfloat16 and bf.qkv[0].dtype == jnp.bfloat16
  # Loose on purpose: bf16 keeps 8 bits of mantissa.
  np.testing.assert_allclose(np.asarray(bf.last_hidden_state, np.float32), a, atol=0.1)


def test_capture_layer_out_of_range():
  config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16)
  model = BertEncoder(config)
  params = model.init_params(jax.random.key(0))
  with pytest.raises(ValueError, match="capture_layer 2 is out of range for 2 layers"):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), capture_layer=2)


def test_config_round_trips_hf_json(tmp_path):
  import transformers
  hf = transformers.BertConfig(hidden_size=36, num_attention_heads=3, intermediate_size=50,
                               type_vocab_size=3, hidden_act="relu", layer_norm_eps=1e-7)
  cfg = BertConfig.from_dict(hf.to_dict())
  assert (cfg.hidden_size, cfg.num_attention_heads, cfg.type_vocab_size, cfg.hidden_act,
          cfg.layer_norm_eps) == (36, 3, 3, "relu", 1e-7)
  back = transformers.BertConfig(**cfg.to_hf_dict())
  assert back.intermediate_size == 50 and back.hidden_act == "relu"
  with pytest.raises(ValueError, match="relative_key"):
    BertConfig.from_dict({"position_embedding_type": "relative_key"})


def test_fused_attention_path_equals_the_reference():
  # The path the trainer takes on a GPU in bf16 (jax.nn.dot_product_attention with sequence lengths),
  # run here with its XLA implementation: the same outputs and gradients as the reference attention on
  # right-padded rows (what the trainer's packing makes), and dropout keeps the reference path.
  c = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=32)
  params = BertEncoder(c).init_params(jax.random.key(0))
  ids, mask = random_batch(np.random.default_rng(7), 4, 13, 50, "right", low=1)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  ref, fused = BertEncoder(c), BertEncoder(c, attention_implementation="xla")
  valid = np.asarray(mask)[..., None] > 0
  out = lambda m, p: m.apply({"params": p}, ids, mask).last_hidden_state
  np.testing.assert_allclose(np.where(valid, out(fused, params), 0), np.where(valid, out(ref, params), 0),
                             atol=1e-5, rtol=0)
  loss = lambda m: lambda p: jnp.sum(jnp.where(valid, out(m, p), 0) ** 2)
  # (Leaves whose gradient is 0 in exact arithmetic, the key bias, are compared at the largest leaf's scale.)
  g_fused, g_ref = jax.grad(loss(fused))(params), jax.grad(loss(ref))(params)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_ref))
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  assert str(jax.make_jaxpr(lambda p: out(fused, p))(params)) != str(jax.make_jaxpr(lambda p: out(ref, p))(params))
  drop = lambda m: m.apply({"params": params}, ids, mask, deterministic=False,
                           rngs={"dropout": jax.random.key(1)}).last_hidden_state
  np.testing.assert_array_equal(drop(fused), drop(ref))  # attention dropout: the reference path


def test_a_callable_attention_gets_the_dropout_rate_and_a_key():
  # The trainer's TPU kernel draws its own dropout mask: in training the encoder hands it the rate and a
  # key of the "dropout" stream (a new one per layer); deterministic, rate 0 and no key.
  c = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=32, attention_probs_dropout_prob=0.25)
  calls = []

  def attend(q, k, v, mask, num_heads, window=None, rate=0.0, key=None):
    assert window is None  # BERT has no local layers
    calls.append((num_heads, rate, key))
    return minilm_jax.model.attention(q, k, v, mask, num_heads)

  params = BertEncoder(c).init_params(jax.random.key(0))
  ids, mask = random_batch(np.random.default_rng(7), 2, 9, 50, "right", low=1)
  m = BertEncoder(c, attention_implementation=attend)
  out = m.apply({"params": params}, ids, mask).last_hidden_state
  np.testing.assert_allclose(out, BertEncoder(c).apply({"params": params}, ids, mask).last_hidden_state,
                             atol=1e-6)
  assert [(h, r, k) for h, r, k in calls] == [(4, 0.0, None)] * 2
  calls.clear()
  m.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert [(h, r) for h, r, _ in calls] == [(4, 0.25)] * 2
  keys = [jax.random.key_data(k) for _, _, k in calls]
  assert not np.array_equal(keys[0], keys[1])
  with pytest.raises(ValueError, match="no dropout"):
    minilm_jax.model.fused_attention(*(jnp.ones((1, 4, 8)),) * 3, jnp.ones((1, 4)), 2, "xla", rate=0.1)
