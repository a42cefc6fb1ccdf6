"""The training step and its setup, on a tiny random teacher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import config, corpus, data, hf, sharding, student, train
from minilm_jax import workdir as wd
from conftest import tiny_config


def batches(cfg, teacher_dir, n, start=0):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(teacher_dir)
  rows = data.tokenize_and_pack(corpus.load_texts(cfg.data.source), tok, cfg.data.max_len)
  return [data.host_batch(rows, s, cfg.batch_size, cfg.seed) for s in range(start, start + n)]


def run_steps(s, state, bs):
  losses = []
  for b in bs:
    state, m = s.step(state, s.teacher_params, sharding.put_batch(s.mesh, b))
    losses.append(float(m["loss"]))
  return state, losses


def leaves(tree):
  return dict(hf.flatten(jax.device_get(tree)))


def test_loss_falls_and_frozen_params_stay(tiny_teacher, tiny_corpus):
  cfg = tiny_config(tiny_teacher, tiny_corpus, steps=30)
  s = train.setup(cfg)
  state0 = s.init_state()
  before = leaves(state0.params)
  state, losses = run_steps(s, state0, batches(cfg, tiny_teacher, 30))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  after = leaves(state.params)
  last = "0"  # the student has one layer: its last layer is layer 0
  for path in before:
    frozen = path[:3] == ("encoder", "layer", last) and path[3:5] != ("attention", "self")
    if frozen:
      np.testing.assert_array_equal(before[path], after[path], err_msg="/".join(path))
    else:
      assert not np.array_equal(before[path], after[path]), "/".join(path)


def test_weight_decay_only_on_kernels(tiny_teacher, tiny_corpus):
  # One step with decay on and off from the same state: only decayed tensors may differ (after one
  # step; later steps would see the decayed kernels through the gradient).
  cfg_a = tiny_config(tiny_teacher, tiny_corpus, **{"optim.weight_decay": 0.0, "optim.warmup_steps": 0})
  cfg_b = tiny_config(tiny_teacher, tiny_corpus, **{"optim.weight_decay": 0.5, "optim.warmup_steps": 0})
  bs = batches(cfg_a, tiny_teacher, 1)
  sa, sb = train.setup(cfg_a), train.setup(cfg_b)
  a = leaves(run_steps(sa, sa.init_state(), bs)[0].params)
  b = leaves(run_steps(sb, sb.init_state(), bs)[0].params)
  for path in a:
    same = np.array_equal(a[path], b[path])
    if path[-1] == "bias" or "LayerNorm" in path:
      assert same, "/".join(path)
    elif path[:3] != ("encoder", "layer", "0") or path[3:5] == ("attention", "self"):
      assert not same, "/".join(path)


def test_teacher_init_takes_every_kth_layer_sliced(tiny_teacher, tiny_corpus):
  cfg = tiny_config(tiny_teacher, tiny_corpus, **{"student.init": "teacher"})
  s = train.setup(cfg)
  _, tp = hf.load_pretrained(tiny_teacher)
  sp = leaves(s.init_state().params)
  assert student.teacher_init_layers("teacher", 12, 6) == [0, 2, 4, 6, 8, 10]
  assert student.teacher_init_layers("teacher", 6, 3) == [0, 2, 4]
  assert student.teacher_init_layers("teacher_first", 6, 3) == [0, 1, 2]
  q = sp[("encoder", "layer", "0", "attention", "self", "query", "kernel")]
  np.testing.assert_array_equal(q, tp["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"][:16, :16])
  np.testing.assert_array_equal(sp[("embeddings", "word_embeddings", "embedding")],
                                tp["embeddings"]["word_embeddings"]["embedding"][:, :16])


def test_grad_accumulation_matches_full_batch(tiny_teacher, tiny_corpus):
  # No dropout, so two micro-batches of 4 must give the same update as one batch of 8.
  over = {"student.dropout": 0.0}
  cfg1 = tiny_config(tiny_teacher, tiny_corpus, **over)
  cfg2 = tiny_config(tiny_teacher, tiny_corpus, grad_accum=2, **over)
  bs = batches(cfg1, tiny_teacher, 2)
  s1, s2 = train.setup(cfg1), train.setup(cfg2)
  st1, l1 = run_steps(s1, s1.init_state(), bs)
  st2, l2 = run_steps(s2, s2.init_state(), bs)
  np.testing.assert_allclose(l1, l2, rtol=1e-4)  # whole-model tolerance
  a, b = leaves(st1.params), leaves(st2.params)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg="/".join(k))


def test_nonfinite_step_is_skipped_and_counted(tiny_teacher, tiny_corpus):
  cfg = tiny_config(tiny_teacher, tiny_corpus)
  s = train.setup(cfg)
  state = s.init_state()
  before = leaves(state.params)
  nan_teacher = jax.tree.map(lambda x: x * jnp.nan, s.teacher_params)
  b = sharding.put_batch(s.mesh, batches(cfg, tiny_teacher, 1)[0])
  state, m = s.step(state, nan_teacher, b)
  assert not np.isfinite(float(m["loss"]))
  assert int(state.nonfinite) == 1 and int(state.first_nonfinite) == 0 and int(state.step) == 1
  after = leaves(state.params)
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.parametrize("override, message", [
    ({"loss.relation_heads": 5}, "loss.relation_heads 5 does not divide the teacher hidden size 32"),
    ({"loss.relation_heads": 8, "student.hidden_size": 12, "student.num_heads": 4},
     "loss.relation_heads 8 does not divide the student.hidden_size 12"),
    ({"loss.version": "v1", "student.num_heads": 2, "loss.relation_heads": 2},
     "loss.version 'v1' needs equal head counts: teacher has 4, student.num_heads is 2"),
    ({"loss.teacher_layer": 3}, "loss.teacher_layer 3 is out of range for a 2-layer teacher"),
    ({"data.max_len": 100}, "data.max_len 100 exceeds the teacher's 64 positions"),
    ({"student.init": "magic"}, "student.init 'magic'"),
    ({"precision": "fp8"}, "precision 'fp8'"),
    ({"batch_size": 6, "grad_accum": 4}, "batch_size 6 is not divisible by grad_accum 4"),
    ({"optim.lr": -1.0}, "optim.lr -1.0 must be positive and finite"),
    ({"loss.terms": "relations,outputs"}, "loss.terms: unknown term 'outputs'"),
])
def test_bad_config_is_a_clear_error(tiny_teacher, tiny_corpus, override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    train.setup(tiny_config(tiny_teacher, tiny_corpus, **override))


def test_relation_settings_do_not_matter_without_the_relation_term(tiny_teacher, tiny_corpus):
  config.check_config(tiny_config(tiny_teacher, tiny_corpus, **{"loss.terms": "hidden",
                                                                 "loss.relation_heads": 5}),
                     hf.load_config(tiny_teacher))


def test_bfloat16_precision_runs(tiny_teacher, tiny_corpus):
  cfg = tiny_config(tiny_teacher, tiny_corpus, precision="bfloat16")
  s = train.setup(cfg)
  assert jax.tree.leaves(s.teacher_params)[0].dtype == jnp.bfloat16
  state, losses = run_steps(s, s.init_state(), batches(cfg, tiny_teacher, 2))
  assert np.all(np.isfinite(losses))
  assert jax.tree.leaves(state.params)[0].dtype == jnp.float32


def test_remote_workdir_goes_through_a_local_mirror(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
  """A gs:// workdir: Orbax writes checkpoints there; metrics, events and the export are written to a
  local mirror and copied up. Here a local folder stands in for the bucket."""
  import json
  import os
  import shutil
  monkeypatch.setattr(wd, "is_remote", lambda path: True)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  bucket = str(tmp_path / "bucket")
  cfg = tiny_config(tiny_teacher, tiny_corpus, steps=4, checkpoint_every=2)
  logs = []
  out = train.train_and_evaluate(cfg, bucket, progress=False, log=logs.append)
  mirror = wd.local_dir(bucket)
  assert mirror.startswith(str(tmp_path / "home")) and mirror != bucket
  for name in ("metrics.jsonl", "loss.png", "student/config.json", "student/flax_params.msgpack"):
    assert os.path.isfile(os.path.join(bucket, name)), name
  assert os.listdir(os.path.join(bucket, "tb"))
  assert out["student_dir"] == f"{bucket}/student"
  assert not os.path.exists(os.path.join(mirror, "checkpoints"))
  # A fresh VM: no mirror. The run resumes from the bucket, metrics included.
  shutil.rmtree(mirror)
  shutil.rmtree(os.path.join(bucket, "checkpoints", "4"))
  train.train_and_evaluate(cfg, bucket, progress=False, log=logs.append)
  assert "resuming from step 2" in " ".join(logs)
  with open(os.path.join(bucket, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2, 3, 4]


def test_a_lost_workdir_lock_stops_the_run_before_its_next_checkpoint(tiny_teacher, tiny_corpus, tmp_path,
                                                                     monkeypatch):
  # A gs:// lease taken over by another run: the trainer checks before each save and writes nothing more.
  import os
  from minilm_jax import lock
  checks = []

  def lost():
    checks.append(1)
    return "taken over by host h pid 1" if len(checks) > 1 else None

  monkeypatch.setattr(lock, "acquire", lambda workdir, hosts, log: lock.Lock(workdir, lost=lost))
  w = str(tmp_path / "w")
  cfg = tiny_config(tiny_teacher, tiny_corpus, steps=6, checkpoint_every=2)
  with pytest.raises(lock.LeaseLost, match=r"lost the lock on workdir .* \(taken over by host h pid 1\)"):
    train.train_and_evaluate(cfg, w, progress=False, log=lambda m: None)
  assert sorted(d for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit()) == ["2"]
  assert not os.path.exists(os.path.join(w, "student"))


def test_runs_share_shards_and_a_resume_may_move_them(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
  """data.cache_dir: two runs over the same corpus tokenise it once; a resume may name another cache
  folder or process count (the rows are the same), but not other data."""
  import os
  from minilm_jax import shards
  cache = str(tmp_path / "shared-cache")
  cfg = tiny_config(tiny_teacher, tiny_corpus, steps=3, checkpoint_every=3, **{"data.cache_dir": cache})
  train.train_and_evaluate(cfg, str(tmp_path / "a"), progress=False, log=lambda m: None)
  assert not os.path.exists(tmp_path / "a" / "cache") and len(os.listdir(cache)) == 1
  monkeypatch.setattr(shards, "_make_shard", lambda *a: pytest.fail("tokenised again"))
  train.train_and_evaluate(cfg, str(tmp_path / "b"), progress=False, log=lambda m: None)
  monkeypatch.undo()
  moved = tiny_config(tiny_teacher, tiny_corpus, steps=4, checkpoint_every=3, **{"data.num_proc": 1})
  logs = []
  train.train_and_evaluate(moved, str(tmp_path / "a"), progress=False, log=logs.append)
  assert "resuming from step 3" in " ".join(logs) and os.listdir(tmp_path / "a" / "cache")
  other = tiny_config(tiny_teacher, tiny_corpus, steps=4, **{"data.max_len": 24})
  with pytest.raises(ValueError, match="config key 'data' differs"):
    train.train_and_evaluate(other, str(tmp_path / "a"), progress=False, log=lambda m: None)


def test_a_run_from_before_the_computed_order_resumes_with_a_warning(tiny_teacher, tiny_corpus, tmp_path):
  import json
  import os
  cfg = tiny_config(tiny_teacher, tiny_corpus, steps=3, checkpoint_every=3)
  w = str(tmp_path / "old")
  train.train_and_evaluate(cfg, w, progress=False, log=lambda m: None)
  meta = os.path.join(w, "checkpoints", "3", "meta", "metadata")
  with open(meta) as f:
    saved = json.load(f)
  assert saved.pop("data_order") == data.ORDER
  with open(meta, "w") as f:
    json.dump(saved, f)  # as an earlier version wrote it
  logs = []
  train.train_and_evaluate(tiny_config(tiny_teacher, tiny_corpus, steps=4), w, progress=False,
                           log=logs.append)
  text = " ".join(logs)
  assert "resuming from step 3" in text and "in another order; from step 3 on" in text, logs


def test_teaching_assistant_chain(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
  """teacher (2×32) -> assistant (2×16: the teacher's depth, the student's width) -> student (1×16).
  The teacher is a gs:// folder (the tiny teacher stands in for its local copy): copied once a run."""
  import os
  from minilm_jax import remote
  copies = []
  monkeypatch.setattr(remote, "fetch_remote", lambda url: copies.append(url) or tiny_teacher)
  cfg = tiny_config("gs://bkt/teacher", tiny_corpus, steps=4, checkpoint_every=2,
                    **{"assistant.enabled": True, "assistant.steps": 3})
  w = str(tmp_path / "chain")
  logs = []
  out = train.train_and_evaluate(cfg, w, progress=False, log=logs.append)
  assert copies == ["gs://bkt/teacher"]
  a_model, _ = hf.load_student(os.path.join(w, "assistant"))
  s_model, _ = hf.load_student(w)
  assert (a_model.config.num_hidden_layers, a_model.config.hidden_size) == (2, 16)
  assert (s_model.config.num_hidden_layers, s_model.config.hidden_size) == (1, 16)
  assert out["assistant_dir"] == os.path.join(w, "assistant", "student")
  assert sorted(os.listdir(os.path.join(w, "assistant", "checkpoints"))) == ["2", "3"]
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["2", "4"]
  assert os.path.isfile(os.path.join(w, "loss_chain.png"))
  # The student stage was taught by the assistant, from its last layer.
  from minilm_jax import checkpoint
  meta = checkpoint.read_meta(checkpoint.make_manager(os.path.join(w, "checkpoints"), 2), 4)
  assert meta["teacher"]["path"] == os.path.abspath(out["assistant_dir"])
  # Rerunning resumes each stage on its own: both are already done.
  logs.clear()
  train.train_and_evaluate(cfg, w, progress=False, log=logs.append)
  assert sum("already trained" in l for l in logs) == 2, logs
  assert len(copies) == 2


def test_a_failed_export_is_a_workdir_write_error_and_a_rerun_exports(tiny_teacher, tiny_corpus, tmp_path,
                                                                      monkeypatch):
  """A full disk after the last save (CI saw one): the error says the checkpoints are intact, and the
  same command run again exports the student from them without training."""
  import errno
  import os
  cfg = tiny_config(tiny_teacher, tiny_corpus, steps=2, checkpoint_every=2)
  workdir = str(tmp_path / "w")
  export = hf.export_student

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(hf, "export_student", full)
  with pytest.raises(train.WorkdirWriteError, match="No space left on device.*intact.*step 2"):
    train.train_and_evaluate(cfg, workdir, progress=False, log=lambda m: None)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  monkeypatch.setattr(hf, "export_student", export)
  logs = []
  train.train_and_evaluate(cfg, workdir, progress=False, log=logs.append)
  assert any("already trained to step 2" in m for m in logs), logs
  assert os.path.isfile(os.path.join(workdir, "student", "config.json"))


@pytest.mark.parametrize("lease_lost", [False, True])
def test_a_save_failing_only_at_the_last_wait_is_a_workdir_write_error(tiny_teacher, tiny_corpus, tmp_path,
                                                                      monkeypatch, lease_lost):
  """A full disk can fail an async save only when the run waits for it before exiting (CI saw one, as a
  bare OSError): that is a WorkdirWriteError saying the earlier checkpoints are intact, and it never hides
  an error already on its way out (here a lost lease)."""
  import errno
  import os
  from minilm_jax import checkpoint, lock
  make = checkpoint.make_manager

  def manager(*a, **k):
    m = make(*a, **k)
    close = m.close

    def full():
      close()
      raise OSError(errno.ENOSPC, "No space left on device")
    m.close = full
    return m
  monkeypatch.setattr(checkpoint, "make_manager", manager)
  if lease_lost:
    checks = []
    lost = lambda: checks.append(1) or ("taken over by host h pid 1" if len(checks) > 1 else None)
    monkeypatch.setattr(lock, "acquire", lambda workdir, hosts, log: lock.Lock(workdir, lost=lost))
  w = str(tmp_path / "w")
  cfg = tiny_config(tiny_teacher, tiny_corpus, steps=4, checkpoint_every=2)
  with pytest.raises(lock.LeaseLost if lease_lost else train.WorkdirWriteError) as e:
    train.train_and_evaluate(cfg, w, progress=False, log=lambda m: None)
  if not lease_lost:
    assert isinstance(e.value, OSError)  # the CLI's one-line error for it
    assert "No space left on device" in str(e.value) and "intact (latest complete: step 4)" in str(e.value)
  assert not os.path.exists(os.path.join(w, "student"))


def test_modernbert_teacher_v1_random_init_and_the_assistant_chain(tiny_modernbert, tiny_corpus, tmp_path):
  """A ModernBERT teacher (4×32) distils into ModernBERT students: v1 over its native heads from random
  init, and v2 through an assistant (4×16) into a 2×16 student initialised from the assistant's layers."""
  import os
  from minilm_jax import modernbert
  v1 = tiny_config(tiny_modernbert, tiny_corpus, steps=2, checkpoint_every=2,
                   **{"loss.version": "v1", "student.num_heads": 4, "student.num_layers": 2})
  out = train.train_and_evaluate(v1, str(tmp_path / "v1"), progress=False, log=lambda m: None)
  assert np.isfinite(out["last"]["loss"]) and out["last"]["loss"] > 0
  model, _ = hf.load_student(str(tmp_path / "v1"))
  assert isinstance(model.config, modernbert.ModernBertConfig)
  assert model.config.layer_types == ("full_attention", "sliding_attention")

  chain = tiny_config(tiny_modernbert, tiny_corpus, steps=2, checkpoint_every=2,
                      **{"student.num_layers": 2, "student.init": "teacher", "assistant.enabled": True,
                         "assistant.steps": 2})
  w = str(tmp_path / "chain")
  out = train.train_and_evaluate(chain, w, progress=False, log=lambda m: None)
  a_model, _ = hf.load_student(os.path.join(w, "assistant"))
  s_model, _ = hf.load_student(w)
  assert (a_model.config.num_hidden_layers, a_model.config.hidden_size) == (4, 16)
  assert a_model.config.layer_types == ("full_attention", "sliding_attention", "sliding_attention",
                                        "full_attention")
  assert isinstance(s_model.config, modernbert.ModernBertConfig)
  assert (s_model.config.num_hidden_layers, s_model.config.hidden_size) == (2, 16)


def test_fused_attention_only_for_bfloat16_on_a_gpu(monkeypatch):
  assert train.attention_implementation("bfloat16") is None  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert train.attention_implementation("bfloat16") == "cudnn"
  assert train.attention_implementation("float32") is None


def test_tpu_attention_per_device_is_the_reference_with_the_kernels_dropout_mask(monkeypatch):
  # The trainer's TPU attention (Pallas kernel per device, here in interpret mode): the reference
  # attention whose dropout mask is the kernel's keep_mask of one seed per row drawn from the key.
  from minilm_jax import attention_kernel, dropout_hash, model, modernbert
  monkeypatch.setattr(attention_kernel, "attention",
                      functools.partial(attention_kernel.attention, interpret=True))
  b, t, heads, d, rate = 2, 24, 4, 64, 0.2
  q, k, v = jax.random.normal(jax.random.key(0), (3, b, t, d))
  mask = jnp.asarray(np.arange(t)[None, :] < np.array([[t], [17]]), jnp.int32)
  key = jax.random.key(5)
  mesh = sharding.make_mesh(1, jax.devices()[:1])
  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: train.tpu_attention(mesh, *a, heads, rate=rate, key=key))(q, k, v, mask)
    plain = jax.jit(lambda *a: train.tpu_attention(mesh, *a, heads))(q, k, v, mask)
  keep = dropout_hash.keep_mask(jax.random.bits(key, (b,), jnp.uint32), heads, t, rate)
  want = model.attention(q, k, v, mask, heads, lambda p: jnp.where(keep, p / (1 - rate), 0))
  valid = np.asarray(mask)[..., None] > 0
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-5)
  np.testing.assert_allclose(np.where(valid, plain, 0),
                             np.where(valid, model.attention(q, k, v, mask, heads), 0), atol=1e-5)
  # ModernBERT's local layers: ±window keys (the kernel's tests cover the window with dropout).
  with jax.set_mesh(mesh):
    local = jax.jit(lambda *a: train.tpu_attention(mesh, *a, heads, window=5))(q, k, v, mask)
  want = modernbert.attention(q, k, v, mask, heads, 5)
  np.testing.assert_allclose(np.where(valid, local, 0), np.where(valid, want, 0), atol=1e-5)
  assert train.attention_implementation("float32", "tpu", mesh).func is train.tpu_attention


def test_best_init_is_chosen_recorded_and_named(tiny_teacher, tmp_path):
  # student.init "best": the layer subset chosen on the training corpus before the first step, recorded in
  # the run's metadata (minilm-eval names it), and chosen the same on a resume.
  from minilm_jax.evaluation import runs
  words = "alpha beta gamma delta omega kappa".split()
  rng = np.random.default_rng(1)
  corpus = tmp_path / "train.txt"
  corpus.write_text("\n\n".join(" ".join(f"{' '.join(rng.choice(words, 5))} line {i}." for i in range(6))
                                for _ in range(30)))
  c = tiny_config(tiny_teacher, str(corpus), **{"student.init": "best", "steps": 2, "checkpoint_every": 1})
  w = str(tmp_path / "run")
  said = []
  train.train_and_evaluate(c, w, progress=False, log=said.append)
  layers = runs.init_layers(w, 2)
  assert layers in ([0], [1]) and runs.read_run(w)[1]["student_init_layers"] == layers
  assert any(m.startswith(f"best layer subset: teacher layers {layers[0]} (") for m in said)  # the user sees it
  said = []
  train.train_and_evaluate(c, w, progress=False, log=said.append)  # a resume: the run's own choice, not a new one
  assert runs.read_run(w)[1]["student_init_layers"] == layers
  assert f"student.init best: teacher layers {layers[0]}, as this run chose them at its start" in said
  assert not any("choosing" in m or m.startswith("best layer subset") for m in said)
  assert train.recorded_init_layers(str(tmp_path / "none")) is None
