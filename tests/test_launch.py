"""launch/tpu_vm.sh and launch/gpu.sh: the commands --dry-run prints, argument checks, shellcheck,
and the TPU babysit loop run for real against a fake `gcloud` (a preemption, then a clean finish)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
GPU = ROOT / "launch" / "gpu.sh"

INSTALL = ('set -e; mkdir -p minilm_jax; cd minilm_jax; find . -mindepth 1 -maxdepth 1 ! -name .venv '
           '-exec rm -rf {} +; tar -xzf ~/minilm_jax.tar.gz; if [ ! -x .venv/bin/pip ]; then '
           'if python3 -c "import sys; sys.exit(sys.version_info < (3, 11))" && python3 -m venv .venv; '
           'then :; else rm -rf .venv; PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv; '
           '~/.local/bin/uv venv -q --seed --python 3.12 .venv; fi; fi; .venv/bin/pip install -q -e ".[gcs]"; '
           '.venv/bin/pip install -q -U "jax[tpu]"')


def sh(script: Path, *args: str, env: dict | None = None, timeout: float = 30):
  full_env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
  full_env.update({"TMPDIR": "/tmp", **(env or {})})
  return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, cwd=ROOT,
                        env=full_env, timeout=timeout)


def tpu(*args: str, **kw):
  return sh(TPU, *args, **kw)


BASE = ("--name", "mini", "--zone", "us-central2-b", "--workdir", "gs://bkt/run1",
        "--config", "configs/demo.py")


def commands(out: str) -> list[str]:
  return [l[2:] for l in out.splitlines() if l.startswith("+ ")]


def test_on_demand_dry_run_prints_every_command():
  r = tpu(*BASE, "--dry-run", "--", "--config.steps=100")
  assert r.returncode == 0, r.stderr
  assert r.stderr == ""
  assert commands(r.stdout) == [
      f"git -C {ROOT} ls-files -z --cached --others --exclude-standard | tar -czf /tmp/minilm_jax-mini.tar.gz "
      f"-C {ROOT} --null -T -",
      "gcloud compute tpus tpu-vm describe mini --zone us-central2-b --format='value(state)'",
      "gcloud compute tpus tpu-vm create mini --zone us-central2-b --accelerator-type v4-8 "
      "--version tpu-ubuntu2204-base",
      "gcloud compute tpus tpu-vm scp /tmp/minilm_jax-mini.tar.gz mini:minilm_jax.tar.gz --zone us-central2-b "
      "--worker=all",
      "gcloud compute tpus tpu-vm ssh mini --zone us-central2-b --worker=all --command " + shlex.quote(INSTALL),
      "gcloud compute tpus tpu-vm ssh mini --zone us-central2-b --worker=all --command 'cd minilm_jax && "
      "TPU_ACCELERATOR_TYPE=v4-8 .venv/bin/minilm-distill --config configs/demo.py --workdir gs://bkt/run1 "
      "--config.steps=100'",
  ]
  assert not any("queued-resources" in c or " delete " in c for c in commands(r.stdout))


@pytest.mark.parametrize("tier,track", [("--spot", "gcloud compute"), ("--best-effort", "gcloud alpha compute")])
def test_spot_and_best_effort_use_a_queued_resource(tier, track):
  r = tpu(*BASE, tier, "--project", "my-proj", "--accelerator", "v5litepod-16",
          "--version", "v2-alpha-tpuv5-lite", "--dry-run")
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  loc = "--zone us-central2-b --project my-proj"
  assert (f"{track} tpus queued-resources create mini-qr --node-id mini {loc} --accelerator-type v5litepod-16 "
          f"--runtime-version v2-alpha-tpuv5-lite {tier}") in cmds
  assert f"{track} tpus queued-resources describe mini-qr {loc} --format='value(state.state)'" in cmds
  assert not any("tpu-vm create" in c for c in cmds)
  gcloud = [c for c in cmds if c.startswith("gcloud")]
  assert gcloud and all(loc in c for c in gcloud)  # every gcloud command has --zone and --project


def test_run_step_is_on_all_workers_and_args_survive_the_remote_shell():
  odd = "--config.teacher=/models/my teacher's dir"
  r = tpu(*BASE, "--dry-run", "--", "--config.steps=7", odd)
  assert r.returncode == 0, r.stderr
  run = commands(r.stdout)[-1]
  words = shlex.split(run)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mini"]
  assert "--worker=all" in words
  remote = words[words.index("--command") + 1]
  prefix = "cd minilm_jax && TPU_ACCELERATOR_TYPE=v4-8 .venv/bin/minilm-distill "
  assert remote.startswith(prefix)
  # What the worker's shell makes of the command line: the exact argv we were given.
  argv = subprocess.run(["bash", "-c", "printf '%s\\n' " + remote[len(prefix):]], capture_output=True,
                        text=True, check=True).stdout.splitlines()
  assert argv == ["--config", "configs/demo.py", "--workdir", "gs://bkt/run1", "--config.steps=7", odd]


def test_prepare_runs_minilm_prepare_on_every_worker_with_the_same_arguments():
  r = tpu(*BASE, "--prepare", "--dry-run", "--", "--config.data.source=gs://bkt/wiki")
  assert r.returncode == 0, r.stderr
  assert commands(r.stdout)[-1] == (
      "gcloud compute tpus tpu-vm ssh mini --zone us-central2-b --worker=all --command 'cd minilm_jax && "
      "TPU_ACCELERATOR_TYPE=v4-8 .venv/bin/minilm-prepare --config configs/demo.py --workdir gs://bkt/run1 "
      "--config.data.source=gs://bkt/wiki'")


@pytest.mark.parametrize("tier,delete", [
    ((), "gcloud compute tpus tpu-vm delete mini --zone us-central2-b --quiet"),
    (("--spot",), "gcloud compute tpus queued-resources delete mini-qr --zone us-central2-b --force --quiet"),
])
def test_babysit_dry_run_shows_one_loop_iteration(tier, delete):
  r = tpu(*BASE, *tier, "--babysit", "--poll-seconds", "30", "--max-restarts", "5", "--dry-run")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  loop = lines[lines.index("# babysit: every 30 s while the run goes on, and after it exits non-zero:"):]
  cmds = commands("\n".join(loop))
  create = [c for c in commands(r.stdout) if " create " in c][0]
  run = commands(r.stdout)[-1]
  assert cmds[0] == "gcloud compute tpus tpu-vm describe mini --zone us-central2-b --format='value(state)'"
  assert cmds[1] == delete
  assert cmds[2] == create
  assert cmds[-1] == run and "--worker=all" in run and "--workdir gs://bkt/run1" in run
  assert any("at most 5 restarts" in l and "resumes from gs://bkt/run1" in l for l in loop)
  assert loop[-1] == "# stop when the run exits 0"


def test_repo_url_is_cloned_on_the_workers_instead_of_copied():
  r = tpu(*BASE, "--repo", "https://github.com/acme/minilm_jax.git", "--dry-run")
  assert r.returncode == 0, r.stderr
  assert " scp " not in r.stdout and "tar -czf" not in r.stdout
  assert ("git init -q . && git fetch -q --depth 1 https://github.com/acme/minilm_jax.git HEAD && "
          "git checkout -q FETCH_HEAD") in r.stdout


@pytest.mark.parametrize("workdir", ["/tmp/run1", "gs:/bkt/run1", "s3://bkt/run1", "gs://"])
def test_non_gs_workdir_is_rejected(workdir):
  args = list(BASE)
  args[args.index("gs://bkt/run1")] = workdir
  r = tpu(*args, "--dry-run")
  assert r.returncode == 2
  assert r.stdout == ""
  assert len(r.stderr.splitlines()) == 1
  assert r.stderr.startswith("tpu_vm.sh: error: --workdir must be a gs:// path")


@pytest.mark.parametrize("drop", ["--name", "--zone", "--workdir", "--config"])
def test_missing_required_option_is_rejected(drop):
  args = list(BASE)
  i = args.index(drop)
  del args[i:i + 2]
  r = tpu(*args, "--dry-run")
  assert r.returncode == 2 and r.stdout == ""
  assert len(r.stderr.splitlines()) == 1 and f"missing {drop}" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (("--spot", "--best-effort"), "mutually exclusive"),
    (("--poll-seconds", "0"), "--poll-seconds must be a positive integer"),
    (("--bogus",), "unknown option --bogus"),
    (("--name",), "--name needs a value"),
])
def test_bad_options_exit_2(args, msg):
  r = tpu(*BASE, *args, "--dry-run")
  assert r.returncode == 2 and msg in r.stderr and len(r.stderr.splitlines()) == 1


def test_help():
  r = tpu("--help")
  assert r.returncode == 0 and r.stdout.startswith("Usage: launch/tpu_vm.sh")
  r = sh(GPU, "-h")
  assert r.returncode == 0 and r.stdout.startswith("Usage: launch/gpu.sh")


def test_gpu_dry_run(tmp_path):
  venv = tmp_path / "venv"
  r = sh(GPU, "--venv", str(venv), "--dry-run", "--", "--config", "configs/demo.py", "--workdir", "workdirs/x",
         "--config.batch_size=64", env={"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"})
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == [
      f"+ python3 -m venv {venv}",
      f"+ {venv}/bin/pip install -e {ROOT}",
      f"+ {venv}/bin/pip install -U 'jax[cuda12]'",
      f"+ {venv}/bin/python -c 'import jax; assert jax.default_backend()==\"gpu\"'",
      "# XLA_PYTHON_CLIENT_MEM_FRACTION=.5 (from the environment)",
      f"+ {venv}/bin/minilm-distill --config configs/demo.py --workdir workdirs/x --config.batch_size=64",
  ]


def test_gpu_cuda13_existing_venv_and_bad_cuda(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text("")
  (venv / "bin" / "python").chmod(0o755)
  r = sh(GPU, "--cuda", "13", "--venv", str(venv), "--dry-run", "--", "--workdir", "w")
  assert r.returncode == 0, r.stderr
  assert not any(" -m venv " in c for c in commands(r.stdout))  # it exists: not created again
  assert f"+ {venv}/bin/pip install -U 'jax[cuda13]'" in r.stdout.splitlines()
  r = sh(GPU, "--cuda", "11", "--", "--workdir", "w")
  assert r.returncode == 2 and "--cuda must be 12 or 13" in r.stderr
  r = sh(GPU, "--dry-run")
  assert r.returncode == 2 and "nothing to run" in r.stderr


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
def test_shellcheck(script):
  if not shutil.which("shellcheck"):
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  r = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout


# ------------------------------------------------------------------------------------------------
# The real code path, against a fake gcloud that keeps the node's state in files.

FAKE_GCLOUD = r"""#!/usr/bin/env bash
d=$FAKE_GCLOUD_DIR
printf '%s\n' "$*" >> "$d/log"
if [[ $1 == alpha ]]; then shift; fi
notfound() { echo "ERROR: (gcloud.compute.tpus.$1.describe) NOT_FOUND: Resource was not found" >&2; exit 1; }
case "$3 $4" in
  "tpu-vm describe") s=$(cat "$d/state" 2>/dev/null || echo MISSING); [[ $s != MISSING ]] || notfound tpu-vm; echo "$s" ;;
  "tpu-vm create") echo READY > "$d/state" ;;
  "tpu-vm delete") echo MISSING > "$d/state" ;;
  "queued-resources describe") s=$(cat "$d/qr" 2>/dev/null || echo MISSING); [[ $s != MISSING ]] || notfound qr; echo "$s" ;;
  "queued-resources create") echo ACTIVE > "$d/qr"; echo READY > "$d/state" ;;
  "queued-resources delete") echo MISSING > "$d/qr"; echo MISSING > "$d/state" ;;
  "tpu-vm scp") cp "$5" "$d/copied.tar.gz" ;;
  "tpu-vm ssh")
    cmd=''
    while (($#)); do if [[ $1 == --command ]]; then cmd=$2; fi; shift; done
    if [[ $cmd == *minilm-distill* ]]; then
      n=$(( $(cat "$d/runs" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$d/runs"
      if [[ -n ${FAKE_PREEMPT:-} && $n == 1 ]]; then echo PREEMPTED > "$d/state"; sleep 60; exit 255; fi
      exit "${FAKE_RUN_RC:-0}"
    fi ;;
  *) echo "fake gcloud: unexpected: $*" >&2; exit 9 ;;
esac
"""


@pytest.fixture
def fake_gcloud(tmp_path):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "gcloud").write_text(FAKE_GCLOUD)
  (bindir / "gcloud").chmod(0o755)
  state = tmp_path / "state"
  state.mkdir()
  env = {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(state), "TMPDIR": str(tmp_path)}

  def verbs():
    return [" ".join(l.split()[2:4]) for l in (state / "log").read_text().splitlines()]
  return env, state, verbs


def test_babysit_recreates_a_preempted_node_and_reruns(fake_gcloud, tmp_path):
  env, state, verbs = fake_gcloud
  t0 = time.monotonic()
  r = tpu(*BASE, "--babysit", "--poll-seconds", "1", "--", "--config.steps=9",
          env={**env, "FAKE_PREEMPT": "1"}, timeout=40)
  elapsed = time.monotonic() - t0
  assert r.returncode == 0, r.stderr
  bringup = ["tpu-vm create", "tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  assert verbs() == (["tpu-vm describe", *bringup,
                      "tpu-vm describe",                    # the poll during the run: PREEMPTED
                      "tpu-vm describe", "tpu-vm delete", *bringup])
  assert (state / "runs").read_text().strip() == "2"
  assert "node mini is PREEMPTED: stopping the run" in r.stderr
  assert "run finished (exit 0) after 1 restart(s)" in r.stderr
  assert elapsed < 20  # the preempted run (a 60 s sleep) was killed, not waited for
  runs = [l for l in (state / "log").read_text().splitlines() if "minilm-distill" in l]
  assert len(set(runs)) == 1 and "--workdir gs://bkt/run1 --config.steps=9" in runs[0]  # same command
  # The tarball of the checkout went to the workers and is cleaned up locally afterwards.
  listing = subprocess.run(["tar", "-tzf", str(state / "copied.tar.gz")], capture_output=True, text=True,
                           check=True).stdout.split()
  assert "pyproject.toml" in listing and "launch/tpu_vm.sh" in listing
  assert not list(tmp_path.glob("minilm_jax-*.tar.gz")) and not list(tmp_path.glob("tpu_vm.*"))


def test_spot_run_without_babysit_reuses_a_ready_node_and_returns_the_run_status(fake_gcloud):
  env, state, verbs = fake_gcloud
  r = tpu(*BASE, "--spot", env={**env, "FAKE_RUN_RC": "3"})
  assert r.returncode == 3
  assert verbs() == ["tpu-vm describe", "queued-resources describe", "queued-resources create",
                     "queued-resources describe", "tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  (state / "log").unlink()
  r = tpu(*BASE, "--spot", env=env)  # the node is READY now: reinstall and rerun, no create
  assert r.returncode == 0, r.stderr
  assert verbs() == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
