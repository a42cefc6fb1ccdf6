"""The training objective: its terms, how far each model runs, the projection head, and the frozen set."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import checkpoint, config, hf, losses, objective, optimizer, train
from minilm_jax.model import BertConfig, BertEncoder
from conftest import tiny_config

TEACHER = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=16)
STUDENT = dataclasses.replace(TEACHER, num_hidden_layers=1, hidden_size=16, intermediate_size=24)


def cfg_with(terms, teacher_layer=-1, **kw):
  c = config.default_config()
  c.loss.update(relation_heads=4, terms=terms, teacher_layer=teacher_layer, **kw)
  return c


def batch():
  ids = jax.random.randint(jax.random.key(1), (3, 10), 1, 40)
  mask = jnp.array([[1] * 10, [1] * 6 + [0] * 4, [0] * 3 + [1] * 7])
  return {"input_ids": ids, "attention_mask": mask}


def models():
  tp = BertEncoder(TEACHER).init_params(jax.random.key(2))
  sp = BertEncoder(STUDENT).init_params(jax.random.key(3))
  sp[objective.PROJECTION] = {"kernel": 0.3 * jax.random.normal(jax.random.key(4), (16, 32)),
                              "bias": 0.1 * jnp.ones((32,))}
  return tp, sp


def poison_layers_from(params, first):
  """Teacher params with every layer from `first` on set to NaN: a loss that reads them turns NaN."""
  layers = {k: (jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), v) if int(k) >= first else v)
            for k, v in params["encoder"]["layer"].items()}
  return {**params, "encoder": {"layer": layers}}


def test_terms_match_the_losses_on_the_models_outputs():
  tp, sp = models()
  b = batch()
  f = objective.objective_fn(cfg_with("relations,hidden,embedding", teacher_layer=2), BertEncoder(TEACHER),
                             BertEncoder(STUDENT), 1, pooling=("mean", True))
  total, parts = f(sp, tp, b)
  t = BertEncoder(TEACHER).apply({"params": tp}, b["input_ids"], b["attention_mask"], capture_layer=1)
  s = BertEncoder(STUDENT).apply({"params": objective.student_params(sp)}, b["input_ids"],
                                 b["attention_mask"])
  h_s = s.last_hidden_state @ sp[objective.PROJECTION]["kernel"] + sp[objective.PROJECTION]["bias"]
  m = b["attention_mask"]
  emb = lambda h: losses.sentence_embedding(h, m, "mean", True)
  want = {"relations": losses.minilm_v2_loss(t.qkv, s.qkv, m, 4),
          "hidden": losses.hidden_loss(t.layer_output, h_s, m),
          "embedding": losses.embedding_loss(emb(t.last_hidden_state), emb(h_s), m)}
  for k, v in want.items():
    np.testing.assert_allclose(parts[k], v, rtol=1e-5)
  np.testing.assert_allclose(total, sum(want.values()), rtol=1e-5)


def test_term_weights_scale_each_term():
  tp, sp = models()
  c = cfg_with("relations,hidden", term_weights=(0.5, 3.0))
  total, parts = objective.objective_fn(c, BertEncoder(TEACHER), BertEncoder(STUDENT), 2)(sp, tp, batch())
  np.testing.assert_allclose(total, 0.5 * parts["relations"] + 3.0 * parts["hidden"], rtol=1e-6)


@pytest.mark.parametrize("terms, reads_from", [
    ("relations", 2),          # Q/K/V of layer 1: layer 1's attention/self only
    ("hidden", 2),             # the output of layer 1
    ("relations,hidden", 2),
    ("embedding", None),       # the teacher's final output: every layer
])
def test_the_teacher_runs_only_as_far_as_the_terms_need(terms, reads_from):
  tp, sp = models()
  f = objective.objective_fn(cfg_with(terms), BertEncoder(TEACHER), BertEncoder(STUDENT), 1,
                             pooling=("mean", False))
  # Layers above what the terms need may hold anything: the loss never reads them.
  if reads_from is not None:
    assert np.isfinite(f(sp, poison_layers_from(tp, reads_from), batch())[0])
  else:
    assert not np.isfinite(f(sp, poison_layers_from(tp, 2), batch())[0])
  assert not np.isfinite(f(sp, poison_layers_from(tp, 1), batch())[0])


def test_relations_alone_never_reach_the_students_output_block():
  tp, sp = models()
  f = objective.distill_loss_fn(cfg_with("relations"), BertEncoder(TEACHER), BertEncoder(STUDENT), 2)
  g = jax.grad(f)(sp, tp, batch())
  out_block = g["encoder"]["layer"]["0"]["output"]
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(out_block))
  g = jax.grad(objective.distill_loss_fn(cfg_with("relations,hidden"), BertEncoder(TEACHER),
                                         BertEncoder(STUDENT), 2))(sp, tp, batch())
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g["encoder"]["layer"]["0"]["output"]))
  assert float(jnp.abs(g[objective.PROJECTION]["kernel"]).max()) > 0


def test_projection_starts_as_identity_on_the_first_columns():
  p = objective.init_projection(3, 5)
  np.testing.assert_array_equal(np.asarray(jnp.ones((2, 3)) @ p["kernel"] + p["bias"]),
                                [[1, 1, 1, 0, 0]] * 2)
  assert objective.needs_projection(("relations", "hidden"), 16, 32)
  assert not objective.needs_projection(("relations",), 16, 32)
  assert not objective.needs_projection(("embedding",), 32, 32)


@pytest.mark.parametrize("terms, weights, message", [
    ("relations,bogus", (), "unknown term 'bogus'"),
    ("", (), "loss.terms is empty"),
    ("hidden,hidden", (), "names a term twice"),
    ("relations,hidden", (1.0,), "1 weights for 2 terms"),
    ("relations,hidden", (1.0, -1.0), "finite and ≥ 0"),
    ("relations,hidden", (0.0, 0.0), "at least one weight must be positive"),
])
def test_bad_terms_are_one_line_errors(terms, weights, message):
  with pytest.raises(ValueError, match=message):
    objective.check_terms(cfg_with(terms, term_weights=weights))


def test_frozen_set_follows_the_terms_and_the_projection_is_saved_not_exported(tiny_teacher, tiny_corpus,
                                                                              tmp_path):
  # Relations alone freeze the student's last block (tests/test_train.py); an output term frees it.
  w = str(tmp_path / "run")
  c = tiny_config(tiny_teacher, tiny_corpus, steps=4, **{"loss.terms": "relations,hidden",
                                                           "optim.warmup_steps": 0})
  s = train.setup(c)
  state0 = s.init_state()
  assert objective.PROJECTION in state0.params  # student 16 wide, teacher 32
  labels = jax.tree.leaves(optimizer.make_optimizer(c, state0.params, s.student_config).init(state0.params))
  before = dict(hf.flatten(jax.device_get(state0.params)))
  train.train_and_evaluate(c, w, progress=False, log=lambda m: None)
  mngr = checkpoint.make_manager(os.path.join(w, "checkpoints"), 1)
  after = dict(hf.flatten(jax.device_get(checkpoint.restore_params(mngr, 4))))
  mngr.close()
  assert set(after) == set(before)
  for path in before:
    if path[-1] != "bias" and "LayerNorm" not in path:  # every weight moved: nothing frozen
      assert not np.array_equal(before[path], after[path]), "/".join(path)
  import json
  logged = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  for rec in logged:  # each term is logged beside the weighted total
    np.testing.assert_allclose(rec["loss"], rec["loss_relations"] + rec["loss_hidden"], rtol=1e-5)
  model, exported = hf.load_student(w)
  assert objective.PROJECTION not in exported
  assert set(dict(hf.flatten(exported))) == {p for p in before if p[0] != objective.PROJECTION}
  assert labels  # the optimizer state exists for the projection too


def test_embedding_term_needs_a_sentence_transformers_teacher(tiny_teacher, tiny_corpus):
  c = tiny_config(tiny_teacher, tiny_corpus, **{"loss.terms": "relations,embedding"})
  with pytest.raises(ValueError, match="needs a sentence-transformers teacher"):
    train.setup(c)


def test_sentence_pooling_of_real_and_odd_folders(real_teacher, tmp_path):
  import json
  assert hf.sentence_pooling(real_teacher) == ("mean", True)
  assert hf.sentence_pooling(str(tmp_path)) is None
  (tmp_path / "modules.json").write_text(json.dumps(
      [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
       {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
  (tmp_path / "1_Pooling").mkdir()
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
  assert hf.sentence_pooling(str(tmp_path)) == ("cls", False)
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
      {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
  with pytest.raises(ValueError, match="pooling"):
    hf.sentence_pooling(str(tmp_path))
  (tmp_path / "modules.json").write_text(json.dumps(
      [{"idx": 0, "name": "0", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
  with pytest.raises(ValueError, match="Dense is not supported"):
    hf.sentence_pooling(str(tmp_path))


def test_a_checkpoint_from_before_the_terms_existed_still_resumes():
  import json
  loss = json.loads(json.dumps(config.default_config().loss.to_dict()))  # as a checkpoint reads it back
  now = {"teacher": {"sha256": "x", "path": "t"}, "student_config": {"a": 1},
         "config": {"loss": loss, "seed": 0}}
  old_loss = {k: v for k, v in now["config"]["loss"].items() if k not in ("terms", "term_weights")}
  saved = {**now, "config": {**now["config"], "loss": old_loss}}
  config.check_resume(saved, now)  # the missing keys held their defaults
  changed = {**now, "config": {**now["config"], "loss": {**now["config"]["loss"], "terms": "hidden"}}}
  with pytest.raises(ValueError, match="'loss' differs"):
    config.check_resume(saved, changed)


def test_the_pallas_relation_loss_runs_per_device_and_equals_the_xla_one(monkeypatch):
  # The trainer's TPU path: relation_kernel.kl_rows per device under shard_map (here interpreted, on
  # two CPU devices when there are), the 1/√d scales passed through; v1 and v2.
  import functools
  from minilm_jax import relation_kernel, sharding
  monkeypatch.setattr(relation_kernel, "kl_rows", functools.partial(relation_kernel.kl_rows, interpret=True))
  mesh = sharding.make_mesh(1, jax.devices()[:2])
  rng = np.random.default_rng(4)
  b, t = 2 * len(mesh.devices.flat), 9
  qkv = lambda d: tuple(jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32) for _ in range(3))
  teacher, student = qkv(32), qkv(16)
  mask = jnp.asarray(np.arange(t)[None] < rng.integers(1, t + 1, (b, 1)), jnp.int32)
  for version, heads in (("v1", 4), ("v2", 8)):
    cfg = config.default_config()
    cfg.loss.update(version=version, relation_heads=heads)
    xla = objective.relation_loss_fn(cfg, 4, "xla")(teacher, student, mask)
    with jax.set_mesh(mesh):
      pallas = jax.jit(objective.relation_loss_fn(cfg, 4, "pallas", mesh))(teacher, student, mask)
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, err_msg=version)
