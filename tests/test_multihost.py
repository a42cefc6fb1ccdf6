"""Two processes on localhost (jax.distributed with a local coordinator, 2 CPU devices each) tokenise the
corpus into shared shards (each host its share), train, checkpoint, resume, and match a single-process
run."""

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
  return dict(hf.flatten(load_student(workdir)[1]))


def test_two_processes_train_checkpoint_resume_and_match_one(tiny_teacher, tiny_corpus, tmp_path):
  # Two files: two pieces of the corpus, two shards, one made by each host.
  docs = open(tiny_corpus).read().split("\n\n")
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(docs[:2]))
  (tmp_path / "corpus" / "b.txt").write_text("\n\n".join(docs[2:]))
  args = ["--config", DEMO, f"--config.teacher={tiny_teacher}",
          f"--config.data.source={tmp_path / 'corpus'}", *TINY_CLI_ARGS, "--config.steps=6",
          "--config.checkpoint_every=3"]
  single = str(tmp_path / "single")
  r = subprocess.run(cli(*args, "--workdir", single), capture_output=True, text=True, env=env(),
                     cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "made 2 of 2 token shards" in r.stdout

  multi = str(tmp_path / "multi")
  outs = two_processes(args, multi)
  assert all("made 1 of 2 token shards" in out for out, _ in outs)  # the hosts shared the work
  assert os.listdir(os.path.join(multi, "cache")) == os.listdir(os.path.join(single, "cache"))
  ckpts = os.path.join(multi, "checkpoints")
  assert sorted(d for d in os.listdir(ckpts) if d.isdigit()) == ["3", "6"]
  # Lose the last checkpoint and the export: the rerun must resume from step 3 on both hosts.
  shutil.rmtree(os.path.join(ckpts, "6"))
  shutil.rmtree(os.path.join(multi, "student"))
  outs = two_processes(args, multi)
  assert all("resuming from step 3" in out for out, _ in outs)
  assert not any("token shards" in out for out, _ in outs)  # made once, then reused
  assert "student written to" in outs[0][0] and "student written to" not in outs[1][0]

  want, got = load_params(single), load_params(multi)
  assert set(want) == set(got)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg="/".join(k))
