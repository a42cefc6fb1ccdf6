"""The real `minilm-distill` command, driven as a subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TINY_CLI_ARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def cli(*args):
  return [sys.executable, "-m", "minilm_jax.cli", *args]


def env():
  e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  e.pop("XLA_FLAGS", None)
  return e


def run(*args, timeout=600):
  return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_help_lists_the_flags():
  r = run("--help")
  assert r.returncode == 0
  assert "--config" in r.stdout and "--workdir" in r.stdout


def test_demo_runs_loss_falls_and_student_loads(real_teacher, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  import minilm_jax
  workdir = str(tmp_path / "demo")
  # Batch 8, not the demo's 32: the same path, a quarter of the steps' time. The layers student.init
  # "best" picks for the demo (0, 4, 5), given: its minute of choosing is tested in test_train.py.
  r = run("--config", DEMO, "--workdir", workdir, "--config.steps=16", "--config.log_every=4",
          "--config.batch_size=8", "--config.checkpoint_every=8", "--config.student.init=layers:0,4,5")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"student written to {workdir}/student" in r.stdout
  rows = read_metrics(workdir)
  assert [m["step"] for m in rows] == [4, 8, 12, 16]
  for m in rows:
    assert {"step", "loss", "learning_rate", "tokens_per_s"} <= set(m)
    assert m["tokens_per_s"] > 0
  assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], rows
  for name in ("loss.png", "student/config.json", "student/model.safetensors", "student/tokenizer.json",
               "student/flax_params.msgpack", "student/README.md"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tb"))
  # The export loads in transformers with every encoder weight, and agrees with the Flax student.
  tm, info = transformers.BertModel.from_pretrained(os.path.join(workdir, "student"),
                                                    output_loading_info=True)
  assert not [k for k in info["missing_keys"] if not k.startswith("pooler.")], info
  model, params = minilm_jax.load_student(workdir)
  assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 384
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(workdir, "student"))
  enc = tok(["a distilled student", "loads anywhere"], padding=True, return_tensors="np")
  flax_out = model.apply({"params": params}, enc["input_ids"], enc["attention_mask"]).last_hidden_state
  with torch.no_grad():
    torch_out = tm.eval()(input_ids=torch.tensor(enc["input_ids"]),
                          attention_mask=torch.tensor(enc["attention_mask"])).last_hidden_state.numpy()
  valid = enc["attention_mask"][..., None] > 0
  np.testing.assert_allclose(np.where(valid, flax_out, 0), np.where(valid, torch_out, 0), atol=1e-4)
  # And as a sentence-transformers model: the teacher's mean pooling and normalisation, carried over.
  st = pytest.importorskip("sentence_transformers")
  emb = st.SentenceTransformer(os.path.join(workdir, "student"), device="cpu").encode(
      ["a distilled student", "loads anywhere"])
  mean = (np.asarray(flax_out) * valid).sum(1) / valid.sum(1)
  np.testing.assert_allclose(emb, mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-4)


def test_interrupted_then_resumed_run_is_bit_identical(tiny_teacher, tiny_corpus, tmp_path):
  args = ["--config", DEMO, f"--config.teacher={tiny_teacher}", f"--config.data.source={tiny_corpus}",
          "--config.steps=300", "--config.checkpoint_every=100", *TINY_CLI_ARGS]
  whole = str(tmp_path / "whole")
  r = run(*args, "--workdir", whole)
  assert r.returncode == 0, r.stderr[-3000:]

  # Stop the second run with SIGTERM (what a preempted TPU VM gets) between two checkpoints.
  cut = str(tmp_path / "cut")
  proc = subprocess.Popen(cli(*args, "--workdir", cut), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env(), cwd=ROOT)
  metrics = os.path.join(cut, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 5:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.01)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by SIGTERM at step" in out, (out, err[-2000:])
  stopped_at = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert 5 <= stopped_at < 300 and stopped_at % 100, stopped_at  # between checkpoints
  assert not os.path.exists(os.path.join(cut, "student"))

  r = run(*args, "--workdir", cut)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming from step {stopped_at}" in r.stdout
  for name in ("flax_params.msgpack", "model.safetensors"):
    with open(os.path.join(whole, "student", name), "rb") as a, open(os.path.join(cut, "student", name),
                                                                     "rb") as b:
      assert a.read() == b.read(), name
  strip = lambda rows: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in rows]
  assert strip(read_metrics(whole)) == strip(read_metrics(cut))


def test_modernbert_teacher_to_student_folder_to_transformers(tiny_modernbert, tiny_corpus, tmp_path):
  # The whole round trip on a tiny random ModernBERT: folder -> minilm-distill -> student folder ->
  # transformers.AutoModel (as ModernBertModel) and sentence-transformers, agreeing with the Flax student.
  torch = pytest.importorskip("torch")
  import transformers
  import minilm_jax
  w = str(tmp_path / "mb")
  r = run("--config", DEMO, f"--config.teacher={tiny_modernbert}", f"--config.data.source={tiny_corpus}",
          *TINY_CLI_ARGS, "--config.student.num_layers=2", "--config.student.init=teacher",
          "--config.loss.terms=relations,hidden", "--config.steps=6", "--config.checkpoint_every=3",
          "--workdir", w)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = read_metrics(w)
  assert rows[-1]["loss"] < rows[0]["loss"], rows
  folder = os.path.join(w, "student")
  tm, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True,
                                                    attn_implementation="eager")
  assert type(tm).__name__ == "ModernBertModel"
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert tm.config.num_hidden_layers == 2 and tm.config.hidden_size == 16
  model, params = minilm_jax.load_student(w)
  assert isinstance(model, minilm_jax.ModernBertEncoder)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  enc = tok(["a distilled student of a modern bert", "loads anywhere"], padding=True, return_tensors="np")
  flax_out = model.apply({"params": params}, enc["input_ids"], enc["attention_mask"]).last_hidden_state
  with torch.no_grad():
    torch_out = tm.eval()(input_ids=torch.tensor(enc["input_ids"]),
                          attention_mask=torch.tensor(enc["attention_mask"])).last_hidden_state.numpy()
  valid = enc["attention_mask"][..., None] > 0
  np.testing.assert_allclose(np.where(valid, flax_out, 0), np.where(valid, torch_out, 0), atol=1e-4)
  st = pytest.importorskip("sentence_transformers")
  emb = st.SentenceTransformer(folder, device="cpu").encode(["loads anywhere"])
  assert emb.shape == (1, 16)
  assert "ModernBertModel" in open(os.path.join(folder, "README.md")).read()


def prepare(*args, timeout=600):
  code = "import sys; from minilm_jax import cli; cli.prepare_main(sys.argv)"
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        timeout=timeout, env=env(), cwd=ROOT)


def test_minilm_prepare_makes_the_shards_the_run_then_reads(tiny_teacher, tiny_corpus, tmp_path):
  w = str(tmp_path / "run")
  args = ["--config", DEMO, f"--config.teacher={tiny_teacher}", f"--config.data.source={tiny_corpus}",
          *TINY_CLI_ARGS]
  r = prepare(*args, "--workdir", w)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "made 1 of 1 token shards" in r.stdout and r.stdout.strip().splitlines()[-1].startswith(
      f"shards in {w}/cache/")
  assert os.listdir(w) == ["cache"]  # nothing of a run yet
  r = run(*args, "--workdir", w, "--config.steps=2", "--config.checkpoint_every=2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "token shards" not in r.stdout  # tokenised once, by minilm-prepare
  # Another place for the shards; and the errors a user meets first.
  elsewhere = str(tmp_path / "shards")
  r = prepare(*args, f"--config.data.cache_dir={elsewhere}")
  assert r.returncode == 0 and os.listdir(elsewhere) == os.listdir(os.path.join(w, "cache"))
  r = prepare(*args)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
      "minilm-prepare: error: --config and --workdir (or --config.data.cache_dir) are required (see --help)")
  r = prepare(*args, "--workdir", str(tmp_path / "bad"), f"--config.data.source={tmp_path / 'none.txt'}")
  assert r.returncode == 2 and "no such file or folder" in r.stderr and not os.path.exists(tmp_path / "bad")


def test_ctrl_c_while_tokenising_is_one_line(tiny_teacher, tmp_path):
  # Outside the training loop (which checkpoints on Ctrl-C instead), an interrupt ends the command with
  # one line and exit code 130, not a traceback from the parent or its tokenising workers.
  corpus = tmp_path / "c.txt"
  para = " ".join(f"word{i % 97} of a sentence." for i in range(60))
  with open(corpus, "w") as f:
    for _ in range(40000):  # ~20 MB: tokenising takes far longer than the test waits
      f.write(para + "\n\n")
  code = "import sys; from minilm_jax import cli; cli.prepare_main(sys.argv)"
  p = subprocess.Popen([sys.executable, "-c", code, "--config", DEMO, f"--config.teacher={tiny_teacher}",
                        f"--config.data.source={corpus}", *TINY_CLI_ARGS, "--workdir", str(tmp_path / "w")],
                       env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       start_new_session=True)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.isdir(tmp_path / "w" / "cache"):
      assert p.poll() is None, p.stderr.read()[-2000:]
      time.sleep(0.1)
    time.sleep(1.0)  # the workers are tokenising
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, err = p.communicate(timeout=60)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  assert p.returncode == 130, err[-2000:]
  assert err.strip().splitlines()[-1] == "minilm-prepare: interrupted" and "Traceback" not in err, err[-2000:]


def test_cpu_devices_reach_the_trainers_mesh(tiny_teacher, tiny_corpus, tmp_path):
  # 3 XLA:CPU devices (whatever this machine's cores) cannot split a batch of 8: the mesh has them,
  # and the command says so in one line.
  p = run("--config", DEMO, *TINY_CLI_ARGS, f"--config.teacher={tiny_teacher}",
          f"--config.data.source={tiny_corpus}", "--config.steps=2", "--config.parallel.cpu_devices=3",
          "--workdir", str(tmp_path / "w"))
  assert p.returncode == 2, p.stderr
  assert p.stderr.strip().splitlines()[-1] == ("minilm-distill: error: batch_size 8 (micro-batch 8) does "
                                               "not divide over the 3 devices; use a multiple of 3")


@pytest.mark.parametrize("key, value", [("grad_accum", 0), ("parallel.fsdp", 0)])
def test_values_the_device_split_reads_are_one_line_errors(tiny_teacher, tiny_corpus, tmp_path, key, value):
  # Read before JAX starts, to split the host: a bad value is still the trainer's one-line error.
  p = run("--config", DEMO, *TINY_CLI_ARGS, f"--config.teacher={tiny_teacher}",
          f"--config.data.source={tiny_corpus}", f"--config.{key}={value}", "--workdir", str(tmp_path / "w"))
  assert p.returncode == 2, p.stderr
  assert p.stderr.strip().splitlines()[-1].startswith(f"minilm-distill: error: {key} {value} must be ")
