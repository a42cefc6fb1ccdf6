"""Every config key's range, as a one-line error naming the key (the combinations that need the teacher
are in test_train.py's test_bad_config_is_a_clear_error)."""

import pytest

from minilm_jax import config

NAN, INF = float("nan"), float("inf")


def with_value(key, value):
  c = config.default_config()
  node = c
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value
  return c


BAD = [("student.num_layers", 0), ("student.hidden_size", 0), ("student.num_heads", 0),
       ("student.intermediate_size", -1), ("student.dropout", 1.0), ("student.dropout", -0.1),
       ("loss.chunk_heads", -1), ("loss.block_keys", -1), ("data.max_len", 4), ("data.num_proc", -1), ("steps", 0), ("batch_size", 0), ("grad_accum", 0),
       ("log_every", 0), ("checkpoint_every", 0), ("keep_checkpoints", 0), ("keep_every", -1),
       ("max_nonfinite_steps", -1), ("optim.lr", -1.0), ("optim.lr", 0.0), ("optim.lr", NAN),
       ("optim.lr", INF), ("optim.warmup_steps", -1), ("optim.weight_decay", -0.01),
       ("optim.weight_decay", INF), ("optim.b1", 1.0), ("optim.b2", -0.5), ("optim.eps", 0.0),
       ("optim.clip_norm", -1.0), ("optim.clip_norm", NAN), ("parallel.fsdp", 0), ("parallel.cpu_devices", -1), ("assistant.steps", -1)]


@pytest.mark.parametrize("key, value", BAD)
def test_each_key_out_of_range_is_a_one_line_error_naming_it(key, value):
  with pytest.raises(ValueError, match=rf"^{key.replace('.', '[.]')} {value!r} must be "):
    config.check_ranges(with_value(key, value))


def test_every_ranged_key_is_tested_and_exists():
  assert {k for k, _ in BAD} == set(config._RANGES)
  config.check_ranges(config.default_config())  # the defaults are in range


@pytest.mark.parametrize("key, value, message", [
    ("teacher", " ", "teacher is empty"),
    ("loss.weights", (1.0, 1.0), "loss.weights (1.0, 1.0): give 2 (v1) or 3 (v2)"),
    ("loss.weights", (1.0, -1.0, 1.0), "loss.weights (1.0, -1.0, 1.0)"),
    ("loss.reduction", "mean", "loss.reduction 'mean': use 'example' or 'token'"),
])
def test_loss_weights_and_reduction(key, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config.check_ranges(with_value(key, value))


@pytest.mark.parametrize("init, message", [
    ("layers:1,3", "student.init 'layers:1,3': 2 teacher layers for a 3-layer student"),
    ("layers:3,1,5", "student.init 'layers:3,1,5': the layers must increase"),
    ("magic", "student.init 'magic': use one of random, teacher, teacher_first, best, or layers:I,J,..."),
])
def test_student_init_is_checked_before_the_teacher_loads(init, message):
  with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", "[.]")):
    config.check_ranges(with_value("student.init", init))
  for good in ("layers:1,3,5", "best", "teacher_first"):
    config.check_ranges(with_value("student.init", good))


def test_a_list_of_teacher_layers_on_the_command_line(tmp_path):
  """--config.student.init=layers:I,J,K is a string to ml_collections (a tuple would need another type);
  a bad list is one line, before anything is written."""
  import subprocess
  import sys
  run = lambda init: subprocess.run(
      [sys.executable, "-c", "from minilm_jax.cli import main; main()", "--config", "configs/demo.py",
       f"--config.student.init={init}", "--config.teacher=/nonexistent", "--workdir", str(tmp_path / "w")],
      capture_output=True, text=True, timeout=120)
  r = run("layers:4,2,0")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
      "minilm-distill: error: student.init 'layers:4,2,0': the layers must increase (each teacher layer once, "
      "in the teacher's order)")
  assert not (tmp_path / "w").exists()
  r = run("layers:1,3,5")   # parsed and accepted: the next error is the teacher's
  assert r.returncode == 2 and "student.init" not in r.stderr and "/nonexistent" in r.stderr
