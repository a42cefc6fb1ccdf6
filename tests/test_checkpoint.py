"""Orbax checkpoints: save, keep policies, the save interval, meta, and resuming past damaged steps."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from minilm_jax import checkpoint


def state_at(step):
  return {"w": jnp.arange(6.0).reshape(2, 3) + step, "step": jnp.int32(step),
          "opt": {"mu": jnp.full((4,), 0.5 * step, jnp.float32)}}


def meta_at(step):
  return {"step": step, "config": {"lr": 1e-3, "name": f"run-{step}"}, "teacher": {"sha": "ab" * 8}}


def abstract():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state_at(0))


def assert_state(state, step):
  want = state_at(step)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for got, exp in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    assert isinstance(got, jax.Array) and got.dtype == exp.dtype and got.shape == exp.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))


@pytest.fixture
def managers():
  """make_manager(...) whose managers are closed at teardown."""
  made = []

  def make(directory, save_every=1, **kw):
    m = checkpoint.make_manager(str(directory), save_every, **kw)
    made.append(m)
    return m

  yield make
  for m in made:
    m.close()


def save_steps(mngr, steps):
  for s in steps:
    assert checkpoint.save(mngr, s, state_at(s), meta_at(s))
  mngr.wait_until_finished()


def step_dirs(directory):
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def corrupt(directory, step):
  """Truncate every array data file of `step` (the OCDBT `d/` folders under state/)."""
  files = [f for f in glob.glob(os.path.join(str(directory), str(step), "state", "**", "d", "*"),
                                recursive=True) if os.path.isfile(f)]
  assert files, sorted(glob.glob(os.path.join(str(directory), str(step), "**"), recursive=True))
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(0)


def plain_restore(mngr, step):
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract())))


def test_save_restore_latest_and_keep(managers, tmp_path):
  d = tmp_path / "ckpt"
  m = managers(d, save_every=1, keep=2)
  save_steps(m, [1, 2, 3])
  assert m.all_steps() == [2, 3]
  assert step_dirs(d) == [2, 3]
  state, meta, step = checkpoint.restore_latest(m, abstract())
  assert step == 3
  assert meta == meta_at(3)
  assert_state(state, 3)
  assert all(x.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
             for x in jax.tree.leaves(state))
  # A fresh manager (a restarted run) finds the same.
  state, meta, step = checkpoint.restore_latest(managers(d, save_every=1, keep=2), abstract())
  assert (step, meta) == (3, meta_at(3))
  assert_state(state, 3)


def test_keep_every_keeps_steps_for_good(managers, tmp_path):
  d = tmp_path / "ckpt"
  m = managers(d, save_every=1, keep=2, keep_every=2)
  save_steps(m, [1, 2, 3])
  assert m.all_steps() == [2, 3]
  save_steps(m, [4, 5, 6, 7])
  assert m.all_steps() == [2, 4, 6, 7]  # every 2nd for good, plus the latest 2
  assert step_dirs(d) == [2, 4, 6, 7]
  state, meta, step = checkpoint.restore_latest(m, abstract())
  assert (step, meta) == (7, meta_at(7))
  assert_state(state, 7)


def test_save_every(managers, tmp_path):
  d = tmp_path / "ckpt"
  m = managers(d, save_every=3, keep=10)
  assert checkpoint.save(m, 3, state_at(3), meta_at(3))
  m.wait_until_finished()
  for s in (4, 5):
    assert checkpoint.save(m, s, state_at(s), meta_at(s), force=False) is False
  m.wait_until_finished()
  assert m.all_steps() == [3]
  assert sorted(os.listdir(d)) == ["3"]  # nothing written, not even a temporary folder
  assert checkpoint.save(m, 6, state_at(6), meta_at(6))
  assert checkpoint.save(m, 7, state_at(7), meta_at(7), force=True)
  m.wait_until_finished()
  assert m.all_steps() == [3, 6, 7]
  state, meta, step = checkpoint.restore_latest(m, abstract())
  assert (step, meta) == (7, meta_at(7))
  assert_state(state, 7)


def test_read_meta(managers, tmp_path):
  m = managers(tmp_path / "ckpt", save_every=1, keep=5)
  save_steps(m, [1, 2])
  assert checkpoint.read_meta(m, 1) == meta_at(1)
  assert checkpoint.read_meta(m, 2) == meta_at(2)


def test_corrupt_latest_falls_back_with_a_warning(managers, tmp_path):
  d = tmp_path / "ckpt"
  m = managers(d, save_every=1, keep=3)
  save_steps(m, [1, 2, 3])
  corrupt(d, 3)
  with pytest.raises(Exception):  # the damage is real: orbax itself cannot read step 3
    plain_restore(m, 3)
  assert_state(plain_restore(m, 2)["state"], 2)
  with pytest.warns(UserWarning, match=r"step 3 is unreadable.*resuming from step 2"):
    state, meta, step = checkpoint.restore_latest(m, abstract())
  assert (step, meta) == (2, meta_at(2))
  assert_state(state, 2)


def test_all_corrupt_refuses_to_start_over(managers, tmp_path):
  d = tmp_path / "ckpt"
  m = managers(d, save_every=1, keep=3)
  save_steps(m, [1, 2])
  for s in (1, 2):
    corrupt(d, s)
  with pytest.raises(RuntimeError, match=r"\[2, 1\].*refusing to start over"):
    checkpoint.restore_latest(m, abstract())
  assert step_dirs(d) == [1, 2]  # nothing deleted


def test_empty_directory(managers, tmp_path):
  assert checkpoint.restore_latest(managers(tmp_path / "new", save_every=1), abstract()) == (None, None, None)
  (tmp_path / "empty").mkdir()
  assert checkpoint.restore_latest(managers(tmp_path / "empty", save_every=1), abstract()) == (None, None, None)


@pytest.mark.parametrize("tmp_name", ["3.orbax-checkpoint-tmp-1712345678901234",
                                      "3.orbax-checkpoint-tmp"])
def test_half_written_checkpoint_is_not_the_latest(managers, tmp_path, tmp_name):
  d = tmp_path / "ckpt"
  m = managers(d, save_every=1, keep=5)
  save_steps(m, [1, 2])
  m.close()
  # What a crash during the save of step 3 leaves: a temporary folder, never renamed into place.
  shutil.copytree(d / "2", d / tmp_name)
  for f in glob.glob(str(d / tmp_name / "**" / "commit_success.txt"), recursive=True):
    os.remove(f)
  m = managers(d, save_every=1, keep=5)
  assert m.all_steps() == [1, 2] and m.latest_step() == 2
  state, meta, step = checkpoint.restore_latest(m, abstract())
  assert (step, meta) == (2, meta_at(2))
  assert_state(state, 2)
  # The resumed run saves step 3 again; the leftover is cleaned up.
  save_steps(m, [3])
  assert m.all_steps() == [1, 2, 3]
  assert sorted(os.listdir(d)) == ["1", "2", "3"]
  state, meta, step = checkpoint.restore_latest(m, abstract())
  assert (step, meta) == (3, meta_at(3))
  assert_state(state, 3)


def tree_of(directory):
  return sorted(os.path.relpath(os.path.join(r, n), directory)
                for r, ds, fs in os.walk(directory) for n in ds + fs)


def test_read_only_reader_leaves_a_save_in_flight_alone(managers, tmp_path):
  d = tmp_path / "ckpt"
  m = managers(d, save_every=1)
  save_steps(m, [1])
  # Another process's save in progress, as Orbax names it; the trainer's own manager would delete it.
  tmp = d / "7.orbax-checkpoint-tmp-123"
  tmp.mkdir()
  (tmp / "part").write_text("half written")
  before = tree_of(d)
  r = checkpoint.open_read_only(str(d))
  assert r.all_steps() == [1]   # finished steps only
  assert checkpoint.read_meta(r, 1) == meta_at(1)
  assert_state(plain_restore(r, 1)["state"], 1)
  r.close()
  assert tree_of(d) == before
  # And while the trainer's own asynchronous save is under way, the reader does not disturb it.
  assert checkpoint.save(m, 2, state_at(2), meta_at(2))
  r = checkpoint.open_read_only(str(d))
  r.all_steps()
  r.close()
  m.wait_until_finished()
  assert step_dirs(d) == [1, 2] and tmp.is_dir()
  assert_state(plain_restore(m, 2)["state"], 2)


def test_read_only_reader_creates_nothing(tmp_path):
  d = tmp_path / "absent"
  r = checkpoint.open_read_only(str(d))
  assert r.latest_step() is None
  r.close()
  assert not d.exists()
