"""The Flax ModernBERT against transformers' PyTorch ModernBertModel (fp32, 1e-4), its loading and export,
its attention chunking, and the student's init, frozen set and relations on it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minilm_jax
from minilm_jax import hf, losses, modernbert, student
from minilm_jax.modernbert import FULL, SLIDING, ModernBertConfig, ModernBertEncoder
from conftest import make_tiny_modernbert, random_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ATOL = 1e-4


def torch_outputs(model, ids, mask):
  """last_hidden_state, every layer's (q, k, v) with q and k rotated as the layer's attention uses them,
  every layer's output through final_norm, and the attention probabilities (eager)."""
  from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb
  wqkv = []
  hooks = [layer.attn.Wqkv.register_forward_hook(lambda m, i, o: wqkv.append(o.detach()))
           for layer in model.layers]
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                output_attentions=True)
    b, t = ids.shape
    cfg = model.config
    pos = torch.arange(t)[None]
    qkvs = []
    for i, o in enumerate(wqkv):
      q, k, v = o.view(b, t, 3, cfg.num_attention_heads, -1).unbind(2)
      cos, sin = model.rotary_emb(o, pos, cfg.layer_types[i])
      q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
      flat = lambda x: x.transpose(1, 2).reshape(b, t, -1).numpy()
      qkvs.append((flat(q), flat(k), v.reshape(b, t, -1).numpy()))
    # hidden_states: the embeddings, each layer's output, but the last one already through final_norm.
    layer_outs = [model.final_norm(h).numpy() for h in out.hidden_states[1:-1]] + \
        [out.hidden_states[-1].numpy()]
  for h in hooks:
    h.remove()
  return out.last_hidden_state.numpy(), qkvs, layer_outs, [a.numpy() for a in out.attentions]


def assert_parity(folder, tm, ids, mask):
  config, params = minilm_jax.load_pretrained(folder)
  assert isinstance(config, ModernBertConfig)
  want_h, want_qkv, want_out, _ = torch_outputs(tm, ids, mask)
  model = ModernBertEncoder(config)
  valid = mask[..., None] > 0  # padded positions are garbage in both; compare real tokens
  close = lambda got, want: np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0),
                                                       atol=ATOL, rtol=0)
  for layer in range(config.num_hidden_layers):
    out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), capture_layer=layer)
    for got, want in zip(out.qkv, want_qkv[layer]):
      close(got, want)
    close(out.layer_output, want_out[layer])
    close(out.last_hidden_state, want_h)
    # stop_at_capture returns the same Q/K/V and nothing above them.
    stopped = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), capture_layer=layer,
                          stop_at_capture=True)
    assert stopped.last_hidden_state is None
    for got, want in zip(stopped.qkv, out.qkv):
      np.testing.assert_array_equal(got, want)


PATTERNS = {  # layer_types of a 5-layer model, or None: transformers' default (global every 3rd)
    "every 3rd (default)": None,
    "all global": [FULL] * 5,
    "every 2nd": [FULL, SLIDING, FULL, SLIDING, FULL],
    "irregular": [SLIDING, FULL, FULL, SLIDING, SLIDING],
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_parity_with_transformers(pattern, tmp_path):
  # T = 23 > the ±4-token window, so the local layers really are local; right and left padding.
  bias = pattern == "irregular"  # the variants with every bias on, once
  tm = make_tiny_modernbert(str(tmp_path), layers=5, local_attention=8, layer_types=PATTERNS[pattern],
                            tokenizer=False, norm_bias=bias, attention_bias=bias, mlp_bias=bias)
  for padding in ("right", "left"):
    ids, mask = random_batch(np.random.default_rng(0), 4, 23, 99, padding, low=4)
    assert_parity(str(tmp_path), tm, ids, mask)


def test_chunked_attention_equals_the_whole_and_transformers(tmp_path, monkeypatch):
  # 37 tokens in query chunks of 8 (ATTENTION_CHUNK 16), windows of ±4 crossing chunk borders, and a
  # last chunk that is partly padding; values, and gradients through the checkpointed chunks.
  tm = make_tiny_modernbert(str(tmp_path), layers=2, local_attention=8, tokenizer=False,
                            layer_types=[FULL, SLIDING])
  ids, mask = random_batch(np.random.default_rng(1), 3, 37, 99, "left", low=4)
  config, params = minilm_jax.load_pretrained(str(tmp_path))
  model = ModernBertEncoder(config)
  f = lambda p: model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
  loss = lambda p: jnp.sum(jnp.where(mask[..., None] > 0, f(p), 0) ** 2)
  whole, g_whole = f(params), jax.grad(loss)(params)
  monkeypatch.setattr(modernbert, "ATTENTION_CHUNK", 16)
  chunked, g_chunked = f(params), jax.grad(loss)(params)
  assert "scan" in str(jax.make_jaxpr(f)(params))  # the chunked path did run
  valid = mask[..., None] > 0
  np.testing.assert_allclose(np.where(valid, chunked, 0), np.where(valid, whole, 0), atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert_parity(str(tmp_path), tm, ids, mask)


def test_v1_attention_relation_is_the_layers_own_attention(tmp_path):
  # Q and K are exposed after the rotation: softmax(QKᵀ/√d) over a global layer's real keys is exactly
  # the attention distribution transformers computes in that layer (before rotation it would not be).
  tm = make_tiny_modernbert(str(tmp_path), layers=2, tokenizer=False, layer_types=[SLIDING, FULL])
  ids, mask = random_batch(np.random.default_rng(2), 3, 19, 99, "right", low=4)
  config, params = minilm_jax.load_pretrained(str(tmp_path))
  attn = torch_outputs(tm, ids, mask)[3]
  layer = 1
  assert config.layer_types[layer] == FULL
  q, k, _ = ModernBertEncoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                            capture_layer=layer, stop_at_capture=True).qkv
  b, t, h = q.shape
  split = lambda x: np.asarray(x).reshape(b, t, config.num_attention_heads, -1).transpose(0, 2, 1, 3)
  z = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(config.head_dim)
  z = np.where(mask[:, None, None, :] > 0, z, -np.inf)
  r = np.exp(z - z.max(-1, keepdims=True))
  r /= r.sum(-1, keepdims=True)
  real = mask[:, None, :, None] > 0
  np.testing.assert_allclose(np.where(real, r, 0), np.where(real, attn[layer], 0), atol=1e-5, rtol=0)
  # And the v1 loss of the layer against itself is zero.
  qkv = (q, k, _)
  assert float(losses.minilm_v1_loss(qkv, qkv, mask, config.num_attention_heads)) < 1e-6


def test_masked_lm_checkpoint_loads_and_heads_are_dropped(tmp_path):
  torch.manual_seed(3)
  cfg = transformers.ModernBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=40,
                                      max_position_embeddings=64, pad_token_id=0)
  mlm = transformers.ModernBertForMaskedLM(cfg).eval()
  mlm.save_pretrained(str(tmp_path))
  config, params = minilm_jax.load_pretrained(str(tmp_path))
  assert "head" not in params and "decoder" not in params
  ids, mask = random_batch(np.random.default_rng(3), 2, 11, 99, "right", low=4)
  with torch.no_grad():
    want = mlm.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  got = ModernBertEncoder(config).apply({"params": params}, ids, mask).last_hidden_state
  valid = mask[..., None] > 0
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want.numpy(), 0), atol=ATOL)


@pytest.mark.parametrize("layer_types", [None, (SLIDING, FULL, SLIDING)])
def test_export_loads_in_transformers_as_modernbert_without_warnings(layer_types, tmp_path, caplog):
  config = ModernBertConfig(vocab_size=99, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                            intermediate_size=40, max_position_embeddings=64, local_attention=6,
                            layer_types=layer_types or (), pad_token_id=0)
  params = jax.device_get(ModernBertEncoder(config).init_params(jax.random.key(0)))
  params = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(4).standard_normal(x.shape), params)
  hf.save_pretrained(str(tmp_path), config, params)
  with caplog.at_level("WARNING"):
    tm, info = transformers.AutoModel.from_pretrained(str(tmp_path), output_loading_info=True,
                                                      attn_implementation="eager")
  assert type(tm).__name__ == "ModernBertModel"
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert not [r for r in caplog.records if "newly initialized" in r.getMessage()]
  assert list(tm.config.layer_types) == list(config.layer_types)
  ids, mask = random_batch(np.random.default_rng(5), 3, 21, 99, "left", low=4)
  assert_parity(str(tmp_path), tm.eval(), ids, mask)
  # And it reads back as the same config and params.
  again, p2 = minilm_jax.load_pretrained(str(tmp_path))
  assert again == config
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_config_from_transformers_4_keys_and_bad_choices():
  c = ModernBertConfig.from_dict({"model_type": "modernbert", "num_hidden_layers": 7,
                                  "global_attn_every_n_layers": 2, "global_rope_theta": 5e4,
                                  "local_rope_theta": 1e3})
  assert c.layer_types == (FULL, SLIDING, FULL, SLIDING, FULL, SLIDING, FULL) and c.global_every == 2
  assert (c.global_rope_theta, c.local_rope_theta) == (5e4, 1e3)
  with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
    ModernBertConfig.from_dict({"rope_parameters": {"full_attention": {"rope_type": "yarn"}}})
  with pytest.raises(ValueError, match="heads of even width"):
    ModernBertConfig(hidden_size=36, num_attention_heads=4)
  with pytest.raises(ValueError, match="layer_types must name 2 layers"):
    ModernBertConfig(num_hidden_layers=2, layer_types=(FULL,))


def test_student_of_a_modernbert_teacher(tmp_path):
  # Shape: the teacher's rhythm of global layers; init: every k-th layer with Q, K, V (and the GeGLU
  # halves) each sliced, not the fused kernel's first columns; frozen: the last block above its Q/K/V and
  # final_norm, under the relations alone.
  from minilm_jax.config import default_config
  teacher = ModernBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
  tparams = ModernBertEncoder(teacher).init_params(jax.random.key(1))
  cfg = default_config()
  cfg.student.update(num_layers=3, hidden_size=16, num_heads=2, intermediate_size=24, init="teacher",
                     dropout=0.1)
  scfg = student.student_config(cfg, teacher)
  assert isinstance(scfg, ModernBertConfig) and scfg.layer_types == (FULL, SLIDING, SLIDING)
  assert (scfg.attention_dropout, scfg.mlp_dropout, scfg.embedding_dropout) == (0.1, 0.1, 0.1)
  p = student.init_student(cfg, scfg, tparams, 6, jax.random.key(0))
  t_w = np.asarray(tparams["layers"]["2"]["attn"]["Wqkv"]["kernel"]).reshape(32, 3, 32)
  s_w = np.asarray(p["layers"]["1"]["attn"]["Wqkv"]["kernel"]).reshape(16, 3, 16)
  np.testing.assert_array_equal(s_w, t_w[:16, :, :16])  # student layer 1 = teacher layer 2 (k = 2)
  t_wi = np.asarray(tparams["layers"]["4"]["mlp"]["Wi"]["kernel"]).reshape(32, 2, 48)
  np.testing.assert_array_equal(np.asarray(p["layers"]["2"]["mlp"]["Wi"]["kernel"]).reshape(16, 2, 24),
                                t_wi[:16, :, :24])
  np.testing.assert_array_equal(p["embeddings"]["tok_embeddings"]["embedding"],
                                np.asarray(tparams["embeddings"]["tok_embeddings"]["embedding"])[:, :16])
  labels = dict(hf.flatten(student.frozen_labels(p, scfg)))
  assert labels[("layers", "2", "attn_norm", "scale")] == "train"
  assert labels[("layers", "2", "attn", "Wqkv", "kernel")] == "train"
  for frozen in (("layers", "2", "attn", "Wo", "kernel"), ("layers", "2", "mlp_norm", "scale"),
                 ("layers", "2", "mlp", "Wi", "kernel"), ("final_norm", "scale")):
    assert labels[frozen] == "freeze", frozen
  assert labels[("layers", "1", "mlp", "Wo", "kernel")] == "train"
  assert set(dict(hf.flatten(student.frozen_labels(p, scfg, reaches_output=True))).values()) == {"train"}
  # The relations reach exactly the parameters not frozen: a gradient check on the real encoder.
  ids = jnp.asarray(np.random.default_rng(6).integers(4, 99, (2, 10)))
  qkv_loss = lambda params: sum(jnp.sum(x ** 2) for x in ModernBertEncoder(scfg).apply(
      {"params": params}, ids, capture_layer=-1, stop_at_capture=True).qkv)
  grads = dict(hf.flatten(jax.grad(qkv_loss)(p)))
  for path, label in labels.items():
    assert (label == "train") == bool(np.any(np.asarray(grads[path]) != 0)), path


def test_a_callable_attention_gets_each_layers_window_and_the_dropout(tmp_path):
  # The trainer's TPU kernel serves local layers too: the encoder hands it ±local_attention/2 there and
  # None on global layers; in training the attention dropout rate and a key, deterministic 0 and None.
  make_tiny_modernbert(str(tmp_path), layers=2, local_attention=8, tokenizer=False,
                       layer_types=[FULL, SLIDING])
  config, params = minilm_jax.load_pretrained(str(tmp_path))
  config = dataclasses.replace(config, attention_dropout=0.1)
  ids, mask = random_batch(np.random.default_rng(3), 2, 21, 99, "right", low=4)
  calls = []

  def attend(q, k, v, m, num_heads, window=None, rate=0.0, key=None):
    calls.append((window, rate, key is None))
    return minilm_jax.modernbert.attention(q, k, v, m, num_heads, window)

  run = lambda impl, **kw: ModernBertEncoder(config, attention_implementation=impl).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(mask), **kw).last_hidden_state
  valid = mask[..., None] > 0
  np.testing.assert_allclose(np.where(valid, run(attend), 0), np.where(valid, run(None), 0), atol=1e-5,
                             rtol=0)
  assert calls == [(None, 0.0, True), (4, 0.0, True)]
  calls.clear()
  run(attend, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert calls == [(None, 0.1, False), (4, 0.1, False)]


def test_fused_attention_path_with_windows_equals_the_reference(tmp_path):
  # jax.nn.dot_product_attention with sequence lengths and local_window_size (cuDNN's on a GPU), run with
  # its XLA implementation: equal to the reference on right-padded rows, global and local layers alike.
  tm = make_tiny_modernbert(str(tmp_path), layers=2, local_attention=8, tokenizer=False,
                            layer_types=[FULL, SLIDING])
  ids, mask = random_batch(np.random.default_rng(8), 3, 21, 99, "right", low=4)
  config, params = minilm_jax.load_pretrained(str(tmp_path))
  out = lambda impl: ModernBertEncoder(config, attention_implementation=impl).apply(
      {"params": params}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
  valid = mask[..., None] > 0
  np.testing.assert_allclose(np.where(valid, out("xla"), 0), np.where(valid, out(None), 0), atol=1e-5,
                             rtol=0)
  assert_parity(str(tmp_path), tm, ids, mask)


def _rotary_f64(x, theta):
  """transformers' rotation in float64 numpy: x cos + rotate_half(x) sin, and its transpose for a VJP."""
  t, k = x.shape[1], x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, k, 2) / k)
  ang = np.tile(np.arange(t)[:, None] * inv[None], (1, 2))[None, :, None]
  rot = lambda z: np.concatenate([-z[..., k // 2:], z[..., :k // 2]], -1)
  rot_t = lambda z: np.concatenate([z[..., k // 2:], -z[..., :k // 2]], -1)  # rot's transpose
  return (lambda z: z * np.cos(ang) + rot(z) * np.sin(ang)), (lambda dy: dy * np.cos(ang) + rot_t(dy * np.sin(ang)))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2 ** -7)])
def test_rotary_and_its_gradient_against_float64(dtype, tol):
  """The rotation (a matmul with a signed permutation) and its custom VJP (cast once to x's dtype)."""
  x = np.random.default_rng(0).standard_normal((2, 37, 3, 64)) * 3
  dy = np.random.default_rng(1).standard_normal(x.shape)
  xd, dyd = jnp.asarray(x, dtype), jnp.asarray(dy, dtype)
  fwd, vjp = _rotary_f64(np.asarray(xd, np.float64), 1e4)
  y, back = jax.vjp(jax.jit(lambda a: modernbert.rotary(a, 1e4)), xd)
  (dx,) = back(dyd)
  assert y.dtype == dx.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float64), fwd(np.asarray(xd, np.float64)), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(dx, np.float64), vjp(np.asarray(dyd, np.float64)), rtol=tol, atol=tol)
