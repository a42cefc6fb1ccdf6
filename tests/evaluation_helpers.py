"""What the evaluation tests share: a small protocol, a fake site-packages for the package task, tiny
trained runs, a run's file listing, and minilm-eval as a subprocess."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from minilm_jax import train
from minilm_jax.evaluation import protocol
from conftest import tiny_config

# Small enough for tiny models in seconds; the protocol is the same as the default's.
TINY = protocol.Protocol(queries=150, pairs=300, bootstrap=50, package_classes=12, package_per_class=10,
                         seeds=2, lrs=(1e-3,), epochs=1, nsp_train=40, nsp_test=32, finetune_len=32,
                         dev_queries=60)
held = lambda d: int(hashlib.sha1(d.encode()).hexdigest(), 16) % 5 == 0


def fake_site_packages(root, packages=13, docs_per_package=40):
  """`packages` packages of docstrings in their own words, a vendored docstring in two of them, a tests
  folder and a dist-info folder (both ignored)."""
  rng = np.random.default_rng(0)
  shared = "Vendored helper shared by two packages. " + "same words " * 30
  for k in range(packages):
    pkg = root / f"pkg{k}"
    (pkg / "tests").mkdir(parents=True)
    words = [f"{w}{k}" for w in ("alpha", "beta", "gamma", "delta", "omega")]
    body = "".join(f'def f{i}():\n  """Doc {i} of pkg{k}: {" ".join(rng.choice(words, 40))}."""\n\n'
                   for i in range(docs_per_package))
    (pkg / "mod.py").write_text(body + (f'def v():\n  """{shared}"""\n' if k < 2 else ""))
    (pkg / "tests" / "test_x.py").write_text('"""' + "test prose " * 30 + '"""\n')
  (root / "pkg0-1.0.dist-info").mkdir()
  return [str(root)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  return fake_site_packages(tmp_path_factory.mktemp("site"))


def train_run(teacher, corpus, workdir, **overrides):
  c = tiny_config(teacher, corpus, **{"steps": 4, "checkpoint_every": 1, "keep_checkpoints": 1,
                                      "keep_every": 2, **overrides})
  train.train_and_evaluate(c, workdir, progress=False, log=lambda m: None)
  return workdir


def snapshot(folder):
  """Every path under folder (but eval/) with its size and mtime."""
  out = {}
  for d, dirs, files in os.walk(folder):
    dirs[:] = [x for x in dirs if os.path.join(d, x) != os.path.join(folder, "eval")]
    for x in dirs + files:
      st = os.stat(os.path.join(d, x))
      out[os.path.relpath(os.path.join(d, x), folder)] = (st.st_size if x in files else 0, st.st_mtime_ns)
  return out


def eval_cli(*args):
  return subprocess.run([sys.executable, "-c", "from minilm_jax.cli import eval_main; eval_main()", *args],
                        capture_output=True, text=True, timeout=120)
