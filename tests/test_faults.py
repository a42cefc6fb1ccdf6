"""Faults a long run must survive, and bad input that must get a one-line answer (real CLI, subprocess)."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import TINY_CLI_ARGS, make_tiny_teacher
from test_cli import DEMO, ROOT, cli, env, read_metrics, run


def tiny_args(teacher, corpus, *extra):
  return ["--config", DEMO, f"--config.teacher={teacher}", f"--config.data.source={corpus}",
          *TINY_CLI_ARGS, *extra]


def assert_one_line_error(r, *fragments):
  assert r.returncode != 0
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("minilm-distill: error: "), r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  for f in fragments:
    assert f in err[0], err[0]


def assert_last_line_error(r, *fragments):
  """For faults inside Orbax/TensorStore: our error is the last line; their reader/writer threads may
  print asyncio tracebacks above it, but none from a minilm_jax frame."""
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert "minilm-distill: error: " in last, last  # threads may print without a final newline
  last = last[last.index("minilm-distill: error: "):]
  for f in fragments:
    assert f in last, last
  assert "minilm_jax/" not in r.stderr.replace(last, "")


def student_bytes(workdir):
  with open(os.path.join(workdir, "student", "flax_params.msgpack"), "rb") as f:
    return f.read()


# --- Faults ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # ~40 s of kills at random moments; test_cli's SIGTERM resume stays in the default run
def test_kill_9_at_random_moments_then_rerun_is_bit_identical(tiny_teacher, tiny_corpus, tmp_path):
  args = tiny_args(tiny_teacher, tiny_corpus, "--config.steps=240", "--config.checkpoint_every=7",
                   "--config.log_every=1")
  whole = str(tmp_path / "whole")
  assert run(*args, "--workdir", whole).returncode == 0
  cut = str(tmp_path / "cut")
  rng = random.Random(0)
  kills = 0
  for attempt in range(4):  # kill -9 after a random number of logged steps, several times
    proc = subprocess.Popen(cli(*args, "--workdir", cut), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
    metrics = os.path.join(cut, "metrics.jsonl")
    target = rng.randint(2, 40) + (read_last_step(metrics) or 0)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
      if (read_last_step(metrics) or 0) >= target:
        time.sleep(rng.random() * 0.05)  # anywhere in the step, including during a checkpoint write
        proc.kill()
        kills += 1
        break
      time.sleep(0.005)
    proc.wait()
    if proc.returncode == 0:
      break
  assert kills >= 1
  r = run(*args, "--workdir", cut)
  assert r.returncode == 0, r.stderr[-2000:]
  assert student_bytes(whole) == student_bytes(cut)


def read_last_step(path):
  try:
    with open(path) as f:
      lines = [l for l in f if l.strip()]
    return json.loads(lines[-1])["step"] if lines else None
  except (OSError, ValueError):
    return None


def test_corrupted_latest_checkpoint_falls_back(tiny_teacher, tiny_corpus, tmp_path):
  args = tiny_args(tiny_teacher, tiny_corpus, "--config.checkpoint_every=2", "--config.keep_checkpoints=3")
  w = str(tmp_path / "w")
  r = run(*args, "--config.steps=6", "--workdir", w)
  assert r.returncode == 0, r.stderr[-2000:]
  ckpts = os.path.join(w, "checkpoints")
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [2, 4, 6]
  corrupt(os.path.join(ckpts, "6"))
  shutil.rmtree(os.path.join(w, "student"))
  r = run(*args, "--config.steps=6", "--workdir", w)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "checkpoint step 6 is unreadable" in r.stderr and "resuming from step 4" in r.stderr + r.stdout
  # Nothing left that restores: a clear error, never a silent start from step 0.
  for step in (4, 6):
    corrupt(os.path.join(ckpts, str(step)))
  corrupt(os.path.join(ckpts, "2"))
  r = run(*args, "--config.steps=6", "--workdir", w)
  assert_last_line_error(r, "can be restored", "refusing to start over")
  assert sorted(os.listdir(ckpts)) == ["2", "4", "6"]  # nothing deleted


def corrupt(step_dir):
  """Truncate every array data file of a checkpoint step."""
  n = 0
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      p = os.path.join(dirpath, name)
      if os.path.getsize(p) > 64 and "d" in os.path.relpath(dirpath, step_dir).split(os.sep):
        with open(p, "r+b") as f:
          f.truncate(16)
        n += 1
  assert n, f"no data files found under {step_dir}"


@pytest.fixture(scope="module")
def poisoned_teacher(tmp_path_factory):
  """A tiny teacher whose embedding of 'q' is Inf: any batch containing a 'q' gives a NaN loss."""
  from safetensors.numpy import load_file, save_file
  folder = make_tiny_teacher(tmp_path_factory.mktemp("poisoned"))
  from transformers import AutoTokenizer
  q = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("q")
  sd = load_file(os.path.join(folder, "model.safetensors"))
  sd["embeddings.word_embeddings.weight"][q] = np.inf
  save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  return folder


@pytest.fixture(scope="module")
def q_corpus(tmp_path_factory):
  """Documents without 'q', and one document with it."""
  docs = ["attention relations carry what a layer knows " * 3 + str(i) for i in range(40)]
  docs[17] = "a quiet question " * 3
  path = tmp_path_factory.mktemp("qcorpus") / "docs.txt"
  path.write_text("\n\n".join(docs))
  return str(path)


def test_nan_loss_stops_naming_the_step_and_keeps_good_checkpoint(poisoned_teacher, q_corpus, tmp_path):
  w = str(tmp_path / "w")
  args = tiny_args(poisoned_teacher, q_corpus, "--config.steps=60", "--config.checkpoint_every=1",
                   "--config.batch_size=2")
  r = run(*args, "--workdir", w)
  assert_one_line_error(r, "NaN/Inf at step")
  bad_step = int(r.stderr.split("NaN/Inf at step ")[1].split()[0])
  good = int(r.stderr.split("last good checkpoint is step ")[1].split()[0])
  assert good == bad_step - 1
  saved = sorted(int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit())
  assert max(saved) == good
  # The option to skip such steps instead: the run completes and counts them.
  w2 = str(tmp_path / "w2")
  r = run(*args, "--config.max_nonfinite_steps=60", "--workdir", w2)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = read_metrics(w2)
  assert rows[-1]["nonfinite_steps"] >= 1 and rows[-1]["step"] == 60
  from minilm_jax import load_student
  _, params = load_student(w2)
  import jax
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_unwritable_workdir_is_a_clear_error_before_training(tiny_teacher, tiny_corpus, tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  (locked / "keep.txt").write_text("precious")
  os.chmod(locked, 0o500)
  try:
    if os.access(str(locked), os.W_OK):
      pytest.skip("running as a user who can write anywhere (root): use a file as the parent instead")
    r = run(*tiny_args(tiny_teacher, tiny_corpus), "--workdir", str(locked / "w"))
    assert_one_line_error(r, "not writable")
  finally:
    os.chmod(locked, 0o700)


def test_workdir_under_a_file_is_a_clear_error(tiny_teacher, tiny_corpus, tmp_path):
  # Works as root too: nothing can create a folder below a regular file.
  blocker = tmp_path / "file"
  blocker.write_text("precious")
  r = run(*tiny_args(tiny_teacher, tiny_corpus), "--workdir", str(blocker / "w"))
  assert_one_line_error(r, "not writable")
  assert blocker.read_text() == "precious"


def test_full_disk_at_save_is_a_clear_error_and_keeps_earlier_checkpoints(tiny_teacher, tiny_corpus,
                                                                         tmp_path):
  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here")
  mngr = None
  try:
    w = str(mnt / "w")
    # The tiny student's checkpoint is ~100 kB: a few fit, then the disk is full.
    r = run(*tiny_args(tiny_teacher, tiny_corpus, "--config.steps=40", "--config.checkpoint_every=1",
                       "--config.keep_checkpoints=40"), "--workdir", w)
    assert_last_line_error(r, "No space left on device", "earlier checkpoints are intact")
    from minilm_jax import checkpoint
    mngr = checkpoint.make_manager(os.path.join(w, "checkpoints"), 1)
    assert mngr.latest_step() is not None and mngr.latest_step() >= 1
  finally:
    # The manager's threads can hold the folder open; a busy mount that stayed made every later pytest
    # run warn that it could not clear this basetemp. Close it, and detach lazily if still busy.
    if mngr is not None:
      mngr.close()
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
      subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --- Bad input: one line, non-zero exit, no traceback, nothing in the workdir destroyed ------------------

@pytest.mark.parametrize("extra, fragments", [
    (["--config.nope=1"], ["unknown config key '--config.nope'"]),
    (["--config.steps=abc"], ["--config.steps=abc"]),
    (["--config.loss.relation_heads=5"], ["loss.relation_heads 5 does not divide the teacher hidden size 32"]),
    (["--config.loss.version=v1", "--config.student.num_heads=2", "--config.loss.relation_heads=2"],
     ["needs equal head counts: teacher has 4, student.num_heads is 2"]),
    (["--config.loss.teacher_layer=9"], ["loss.teacher_layer 9 is out of range for a 2-layer teacher"]),
    (["--config.teacher=/nonexistent/teacher"], ["/nonexistent/teacher: no such folder"]),
    (["--config.data.max_len=65"], ["data.max_len 65 exceeds the teacher's 64 positions"]),
    (["--config.data.text_field=body"], []),  # .txt files have no fields: not an error, see jsonl below
])
def test_bad_input(tiny_teacher, tiny_corpus, tmp_path, extra, fragments):
  w = tmp_path / "w"
  r = run(*tiny_args(tiny_teacher, tiny_corpus, "--config.steps=2"), *extra, "--workdir", str(w))
  if not fragments:
    assert r.returncode == 0, r.stderr[-2000:]
    return
  assert_one_line_error(r, *fragments)
  assert not os.path.exists(w / "checkpoints") or not os.listdir(w / "checkpoints")


@pytest.mark.parametrize("extra, fragment", [
    (["--config.optim.lr=-1"], "optim.lr -1.0 must be positive and finite"),
    (["--config.student.dropout=1.0"], "student.dropout 1.0 must be in [0, 1)"),
    (["--config.teacher="], "teacher is empty"),
    (["--config.loss.relation_heads=5"], "loss.relation_heads 5 does not divide"),  # checked with the teacher
    (["--config.assistant.enabled=true", "--config.student.num_heads=5"], "does not divide"),
])
def test_a_value_out_of_range_leaves_no_workdir(tiny_teacher, tiny_corpus, tmp_path, extra, fragment):
  r = run(*tiny_args(tiny_teacher, tiny_corpus), *extra, "--workdir", str(tmp_path / "w"))
  assert_one_line_error(r, fragment)
  assert not os.path.exists(tmp_path / "w")


def test_verbose_shows_the_traceback(tiny_teacher, tiny_corpus, tmp_path):
  r = run(*tiny_args(tiny_teacher, tiny_corpus, "--config.loss.relation_heads=5", "--verbose"),
          "--workdir", str(tmp_path / "w"))
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_unsupported_architecture(tiny_teacher, tiny_corpus, tmp_path):
  t = tmp_path / "gpt"
  shutil.copytree(tiny_teacher, t)
  cfg = json.loads((t / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (t / "config.json").write_text(json.dumps(cfg))
  r = run(*tiny_args(str(t), tiny_corpus), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(r, "model_type 'gpt2' is not supported")


def test_tokenizer_vocab_larger_than_embeddings(tiny_teacher, tiny_corpus, tmp_path, real_teacher):
  t = tmp_path / "mismatch"
  shutil.copytree(tiny_teacher, t)
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(real_teacher, name), t / name)
  r = run(*tiny_args(str(t), tiny_corpus), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(r, "has 30522 tokens, but the teacher's embeddings have")


def test_teacher_without_tokenizer_files(tiny_teacher, tiny_corpus, tmp_path):
  """transformers 5 would build a 5-token tokenizer here and the run would train on [UNK]s."""
  t = tmp_path / "no_tok"
  shutil.copytree(tiny_teacher, t)
  for name in os.listdir(t):
    if name not in ("config.json", "model.safetensors"):
      os.remove(t / name)
  r = run(*tiny_args(str(t), tiny_corpus), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(r, "no tokenizer files")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_empty_dataset_and_missing_text_field(tiny_teacher, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  r = run(*tiny_args(tiny_teacher, str(empty)), "--workdir", str(tmp_path / "w1"))
  assert_one_line_error(r, "no non-empty documents")
  rows = tmp_path / "rows.jsonl"
  rows.write_text(json.dumps({"body": "some text"}) + "\n")
  r = run(*tiny_args(tiny_teacher, str(rows)), "--workdir", str(tmp_path / "w2"))
  assert_one_line_error(r, "no text field 'text'", "body")


def test_batch_that_does_not_divide_the_devices(tiny_teacher, tiny_corpus, tmp_path):
  e = env()
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  r = subprocess.run(cli(*tiny_args(tiny_teacher, tiny_corpus, "--config.batch_size=12"), "--workdir",
                         str(tmp_path / "w")), capture_output=True, text=True, env=e, cwd=ROOT,
                     timeout=300)
  assert_one_line_error(r, "batch_size 12", "does not divide over the 8 devices")


def test_resume_with_other_teacher_or_student_is_refused(tiny_teacher, tiny_corpus, tmp_path):
  w = str(tmp_path / "w")
  assert run(*tiny_args(tiny_teacher, tiny_corpus, "--config.steps=2"), "--workdir", w).returncode == 0
  before = sorted(os.listdir(os.path.join(w, "checkpoints")))
  other = make_tiny_teacher(tmp_path / "other", seed=1)
  r = run(*tiny_args(other, tiny_corpus, "--config.steps=4"), "--workdir", w)
  assert_one_line_error(r, "this workdir was trained with teacher", "use a new workdir")
  r = run(*tiny_args(tiny_teacher, tiny_corpus, "--config.steps=4", "--config.student.num_layers=2"),
          "--workdir", w)
  assert_one_line_error(r, "incompatible student")
  # The same weights with another tokenizer: the token ids of the run would change meaning.
  retok = tmp_path / "retok"
  shutil.copytree(tiny_teacher, retok)
  vocab = (retok / "vocab.txt").read_text().splitlines()
  (retok / "vocab.txt").write_text("\n".join(vocab[:5] + vocab[5:][::-1]) + "\n")
  os.remove(retok / "tokenizer.json")
  r = run(*tiny_args(str(retok), tiny_corpus, "--config.steps=4"), "--workdir", w)
  assert_one_line_error(r, "tokenizer files in", "differ", "use a new workdir")
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == before


# --- One writer per workdir ------------------------------------------------------------------------------

def test_a_run_on_a_workdir_in_use_is_refused_and_changes_nothing(tiny_teacher, tiny_corpus, tmp_path):
  from test_lock import hold_in_another_process, tree
  w = tmp_path / "w"
  (w / "checkpoints" / "3").mkdir(parents=True)
  (w / "metrics.jsonl").write_text('{"step": 3}\n')
  holder = hold_in_another_process(w)  # a live run, as the lock sees it
  try:
    time.sleep(0.05)  # mtimes have a resolution
    before = tree(w)
    r = run(*tiny_args(tiny_teacher, tiny_corpus, "--config.steps=2"), "--workdir", str(w))
    assert_one_line_error(r, f"workdir {w} is in use by host {socket.gethostname()} pid {holder.pid} ")
    assert tree(w) == before
  finally:
    holder.kill()
    holder.wait()


def test_a_killed_runs_lock_is_taken_over_with_a_line(tiny_teacher, tiny_corpus, tmp_path):
  from test_lock import hold_in_another_process
  w = str(tmp_path / "w")
  holder = hold_in_another_process(w)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  r = run(*tiny_args(tiny_teacher, tiny_corpus, "--config.steps=2"), "--workdir", w)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"taking over a stale lock on {w} left by host {socket.gethostname()} pid {holder.pid} " in r.stdout
  assert read_metrics(w)[-1]["step"] == 2


@pytest.mark.slow
def test_two_trainers_on_one_workdir(tiny_teacher, tiny_corpus, tmp_path):
  """The real thing: a second minilm-distill while the first runs is refused and changes nothing; once the
  first is killed, a third takes its lock over and resumes from its checkpoint."""
  from test_lock import tree
  args = tiny_args(tiny_teacher, tiny_corpus, "--config.steps=400", "--config.checkpoint_every=20")
  w = str(tmp_path / "w")
  first = subprocess.Popen(cli(*args, "--workdir", w), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
  try:
    deadline = time.time() + 300
    saved = lambda: [d for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit()]
    while not (os.path.isdir(os.path.join(w, "checkpoints")) and saved()) and time.time() < deadline:
      assert first.poll() is None
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # alive and holding its lock, but quiet while we look
    time.sleep(0.5)  # mtimes have a resolution
    before = tree(w)
    r = run(*args, "--workdir", w)
    assert_one_line_error(r, f"workdir {w} is in use by host {socket.gethostname()} pid {first.pid} ")
    assert tree(w) == before
  finally:
    first.kill()
    first.wait()
  r = run(*args, "--workdir", w)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"taking over a stale lock on {w} left by host {socket.gethostname()} pid {first.pid} " in r.stdout
  assert "resuming from step" in r.stdout
  assert read_metrics(w)[-1]["step"] == 400
