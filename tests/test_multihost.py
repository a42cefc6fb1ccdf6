"""Two processes on localhost (jax.distributed with a local coordinator, 2 CPU devices each) train,
checkpoint, resume, and match a single-process run."""

import os
import shutil
import socket
import subprocess

import numpy as np

from conftest import TINY_CLI_ARGS
from test_cli import DEMO, ROOT, cli, env


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def two_processes(args, workdir):
  port = free_port()
  e = dict(env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(cli(*args, "--workdir", workdir, f"--coordinator_address=localhost:{port}",
                                "--num_processes=2", f"--process_id={i}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def load_params(workdir):
  from minilm_jax import hf, load_student
  return dict(hf._flatten(load_student(workdir)[1]))


def test_two_processes_train_checkpoint_resume_and_match_one(tiny_teacher, tiny_corpus, tmp_path):
  args = ["--config", DEMO, f"--config.teacher={tiny_teacher}", f"--config.data.source={tiny_corpus}",
          *TINY_CLI_ARGS, "--config.steps=6", "--config.checkpoint_every=3"]
  single = str(tmp_path / "single")
  r = subprocess.run(cli(*args, "--workdir", single), capture_output=True, text=True, env=env(),
                     cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  multi = str(tmp_path / "multi")
  two_processes(args, multi)
  ckpts = os.path.join(multi, "checkpoints")
  assert sorted(d for d in os.listdir(ckpts) if d.isdigit()) == ["3", "6"]
  # Lose the last checkpoint and the export: the rerun must resume from step 3 on both hosts.
  shutil.rmtree(os.path.join(ckpts, "6"))
  shutil.rmtree(os.path.join(multi, "student"))
  outs = two_processes(args, multi)
  assert all("resuming from step 3" in out for out, _ in outs)
  assert "student written to" in outs[0][0] and "student written to" not in outs[1][0]

  want, got = load_params(single), load_params(multi)
  assert set(want) == set(got)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg="/".join(k))
