"""`minilm-distill --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`, `minilm-prepare` (the
same flags: the run's token shards, made ahead of it), `minilm-compile` (the same config, compiled for an
accelerator that is not here: --target v4-32, h100, ...) and `minilm-eval`.

Flags only: the logic lives in train.py, shards.py, aot.py and evaluation/. Running the same command again resumes
from DIR's latest checkpoint. Errors print one line and exit non-zero; --verbose shows the traceback.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from minilm_jax import xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override keys with "
                                          "--config.KEY=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the student go; rerun "
                               "with the same workdir to resume. (minilm-prepare: the shards go to "
                               "WORKDIR/cache unless --config.data.cache_dir is set.)")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks on errors.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize() before anything touches devices: 'auto' does it on a multi-host TPU "
    "pod (TPU_WORKER_HOSTNAMES lists several hosts) or when JAX_COORDINATOR_ADDRESS or "
    "--coordinator_address is set.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for "
                                   "multi-process runs outside a TPU pod (with --num_processes, "
                                   "--process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_TARGET = flags.DEFINE_string("target", None, "minilm-compile: the accelerator to compile for, a TPU slice "
                              "(v4-8 ... v4-2048, v5p-8 ..., v5e-1 ... v5e-256, v6e-1 ... v6e-256) or GPUs "
                              "(h100, h200, a100; h100x8 for 8 on one host).")


def _maybe_initialize_distributed():
  """Multi-host runs need jax.distributed before the first device query; every host runs this."""
  on_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  wanted = _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and (
      on_pod or _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")))
  if wanted:
    import jax
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def _cpu_devices(cfg) -> int:
  """parallel.cpu_devices, 0 resolved for this host; 1 in a multi-process run, whose processes would
  each split the global batch on their own."""
  if cfg.parallel.cpu_devices:
    return cfg.parallel.cpu_devices
  if _COORDINATOR.value or _NUM_PROCESSES.value or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return 1
  return xla_flags.cpu_device_count(cfg.batch_size, cfg.parallel.fsdp, cfg.grad_accum)


def _fail(prog: str, e: BaseException) -> None:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  sys.stdout.flush()
  sys.stderr.flush()
  # Orbax/TensorStore threads may still print asyncio tracebacks after a failed restore. Point fd 2 at
  # /dev/null first and write our line to a saved copy, so the error is always the last line printed.
  real_stderr = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  os.write(real_stderr, f"{prog}: error: {msg}\n".encode())
  # Skip interpreter teardown, which is where those threads are torn down. Any checkpoint save was
  # already waited for (train.py's _finish_saves).
  os._exit(2)


def _distill(argv):
  if len(argv) > 1:
    _fail("minilm-distill", ValueError(f"unexpected arguments: {' '.join(argv[1:])}"))
  if _CONFIG.value is None or not _WORKDIR.value:
    _fail("minilm-distill", ValueError("--config and --workdir are required (see --help)"))
  xla_flags.skip_absent_tpu()  # no page of libtpu errors on a host without a TPU
  xla_flags.set_tpu_flags()  # before JAX starts libtpu, which reads them once
  xla_flags.set_cpu_devices(_cpu_devices(_CONFIG.value))  # and XLA:CPU, which reads XLA_FLAGS once
  import warnings
  warnings.formatwarning = lambda msg, *_, **__: f"minilm-distill: warning: {msg}\n"
  from absl import logging
  logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)  # Orbax is chatty at INFO
  from minilm_jax import train
  try:
    _maybe_initialize_distributed()
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError) as e:
    if _VERBOSE.value:
      raise
    _fail("minilm-distill", e)
  if summary.get("last"):
    print(f"final loss {summary['last']['loss']:.5f} at step {summary['step']}")


def _prepare(argv):
  if len(argv) > 1:
    _fail("minilm-prepare", ValueError(f"unexpected arguments: {' '.join(argv[1:])}"))
  cfg = _CONFIG.value
  if cfg is None or not (_WORKDIR.value or cfg.data.cache_dir):
    _fail("minilm-prepare", ValueError("--config and --workdir (or --config.data.cache_dir) are "
                                       "required (see --help)"))
  from absl import logging
  logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)
  from minilm_jax import config, hf, train
  try:
    _maybe_initialize_distributed()
    config.check_ranges(cfg)
    teacher_dir = hf.resolve(cfg.teacher)
    hf.tokenizer_files(teacher_dir)  # none: a one-line error, not shards of [UNK]s
    folder = train.prepare_data(cfg, teacher_dir, _WORKDIR.value or "", sys.stderr.isatty())
  except (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError) as e:
    if _VERBOSE.value:
      raise
    _fail("minilm-prepare", e)
  print(f"shards in {folder}")


def _config_path(argv):
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None


def _parse(argv):
  """absl parsing, with one-line errors for a missing config file, unknown keys and bad values."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path.split(":")[0]):
    raise ValueError(f"config file {path}: no such file")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: a --config.KEY that does not exist
    key = str(e).strip("\"'")
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
    raise ValueError(f"unknown config key {bad[0] if bad else key!r} (see the config's keys in "
                     "minilm_jax.config.default_config)") from None
  except flags.Error as e:
    raise ValueError(str(e).splitlines()[0]) from None


def main(argv=None, prog="minilm-distill", command=None):
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
    flags.FLAGS.mark_as_parsed()
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own --help exits 1
  try:
    rest = _parse(argv)
  except Exception as e:  # a config file that fails to load raises anything at all
    if "--verbose" in argv:
      raise
    _fail(prog, e)
  try:
    (command or _distill)(rest)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints instead): one line
    if "--verbose" in argv:
      raise
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    # A normal exit, so that multiprocessing's finalisers release what the tokenising pool held (else
    # its resource tracker warns of leaked semaphores); forced after 10 s if a thread keeps it alive.
    import threading
    timer = threading.Timer(10.0, os._exit, (130,))
    timer.daemon = True
    timer.start()
    sys.exit(130)


def _compile(argv):
  if len(argv) > 1:
    _fail("minilm-compile", ValueError(f"unexpected arguments: {' '.join(argv[1:])}"))
  if _CONFIG.value is None or not _TARGET.value:
    _fail("minilm-compile", ValueError("--config and --target are required (see --help)"))
  import json
  from absl import logging
  logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)
  from minilm_jax import aot
  try:
    c = aot.compile_step(_CONFIG.value, _TARGET.value)
    r = aot.report(c)
    print(aot.table(r))
    print(json.dumps(r), flush=True)
    aot.check_fits(c, r)
  except (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError) as e:
    if _VERBOSE.value:
      raise
    _fail("minilm-compile", e)


def compile_main(argv=None):
  """`minilm-compile --config configs/NAME.py --target NAME [--config.KEY=VALUE ...]`: the trainer's step
  of that config compiled for a TPU slice or a GPU that is not here (aot.py); prints a short table and,
  last, one JSON line; exits non-zero with a one-line error when the step does not fit."""
  # Compiling never runs anything: keep JAX off any accelerator this machine may have.
  os.environ["JAX_PLATFORMS"] = "cpu"
  main(argv, "minilm-compile", _compile)


def prepare_main(argv=None):
  """`minilm-prepare --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`: tokenise the run's
  corpus into its shards ahead of the run (on a pod: on every host, which split the work)."""
  main(argv, "minilm-prepare", _prepare)


def eval_main(argv=None):
  """`minilm-eval --workdir DIR [--workdir DIR2 ...] [--out OUT] [--text SOURCE] [--seeds N]
  [--no-finetune] [--task glue:NAME|FILE:cols] [--sts glue:stsb|FILE:a,b,score] [--lr X ...] [--epochs N]
  [--curve] [--teacher DIR]`."""
  import argparse
  p = argparse.ArgumentParser(prog="minilm-eval", description="Evaluate minilm-distill runs of one "
                              "teacher and student shape: the teacher, each run's student and undistilled "
                              "baselines, on zero-shot probes, a package-of-origin task and fine-tuning, "
                              "every number with its standard error or spread.",
                              epilog="The protocol (models, probes, fine-tuning, paired differences, "
                              "outputs): docs/evaluation.md.")
  p.add_argument("--workdir", action="append", required=True, help="a run; give several to compare "
                 "runs that share the teacher and the student shape")
  p.add_argument("--out", help="output folder (default WORKDIR/eval; required with several runs)")
  p.add_argument("--text", help="held-out text for the probes, anything the trainer's data.source takes "
                 "(a .txt/.jsonl/.parquet file or folder); default: the stdlib corpus's held-out split")
  p.add_argument("--text-field", default="text", help="the field or column that holds the text in a "
                 "--text of .jsonl or .parquet files (default: text), as the trainer's data.text_field")
  p.add_argument("--task", action="append", default=[], help="extra fine-tuning tasks beside nsp and "
                 "package: glue:sst2|mnli|qnli|qqp|rte|mrpc|cola (needs the hub), or "
                 "FILE.csv|.tsv|.txt|.jsonl:text_a[,text_b],label (the columns' names in a header line, or their "
                 "0-based numbers in a file without one)")
  p.add_argument("--sts", action="append", default=[], help="a zero-shot probe of human similarity "
                 "scores: the Spearman and Pearson correlation of each model's cosine with them, from "
                 "FILE.csv|.tsv|.txt|.jsonl:text_a,text_b,score (names from a header line, or 0-based numbers "
                 "in a file without one: STS-B's sts-dev.csv:5,6,4), or "
                 "glue:stsb or sickr (need the hub); repeatable")
  import dataclasses
  from minilm_jax.evaluation.protocol import DEFAULT_PROTOCOL as d
  p.add_argument("--lr", action="append", type=float, help=f"fine-tuning learning rates, chosen on dev "
                 f"(default {' '.join(map(str, d.lrs))})")
  p.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs; dev is scored after "
                 f"each, so this is the largest tried (default {d.epochs})")
  p.add_argument("--seeds", type=int, default=d.seeds, help=f"fine-tuning seeds (default {d.seeds})")
  p.add_argument("--no-finetune", action="store_true", help="zero-shot probes, linear probe and "
                 "held-out relation loss only (fast)")
  p.add_argument("--site-packages", action="append", default=[], help="where the package task's "
                 "packages are (default: this Python's site-packages)")
  p.add_argument("--no-baselines", action="store_true", help="the teacher and the runs' students only, "
                 "without the undistilled students of their shape (faster; no paired differences with them)")
  p.add_argument("--teacher", help="the run's teacher (folder, gs:// folder or hub id), where it is no "
                 "longer at the path the run recorded and the run's config.teacher is not found here "
                 "(a run distilled on another machine); checked against the run's recorded sha256")
  p.add_argument("--curve", action="store_true", help="then the student of every kept checkpoint (one "
                 "run) on the cheap probes, against steps, the others as flat lines (curve.png)")
  p.add_argument("--curve-finetune", action="store_true", help="fine-tune at every checkpoint too")
  p.add_argument("--verbose", action="store_true")
  a = p.parse_args(argv)
  try:
    if a.seeds < 1 or a.epochs < 1:
      raise ValueError("--seeds and --epochs must be at least 1")
    if any(not 0 < lr < float("inf") for lr in a.lr or ()):
      raise ValueError(f"--lr {', '.join(map(str, a.lr))}: learning rates must be positive and finite")
    if a.curve and len(a.workdir) > 1:
      raise ValueError("--curve evaluates the checkpoints of one run: give one --workdir")
    protocol = dataclasses.replace(d, lrs=tuple(a.lr or d.lrs), epochs=a.epochs, seeds=a.seeds)
    kw = dict(text=a.text, tasks=a.task, protocol=protocol, package_roots=a.site_packages,
              text_field=a.text_field, teacher=a.teacher, sts=a.sts)
    xla_flags.skip_absent_tpu()  # before JAX starts (see _distill)
    from minilm_jax.evaluation import commands
    commands.evaluate_run(a.workdir, a.out, finetune_too=not a.no_finetune, baselines=not a.no_baselines,
                          **kw)
    if a.curve:
      commands.evaluate_curve(a.workdir[0], a.out, finetune_too=a.curve_finetune, **kw)
  except (ValueError, OSError, KeyError, ImportError) as e:
    if a.verbose:
      raise
    _fail("minilm-eval", e)
  from minilm_jax import workdir as wd
  print(f"results in {a.out or wd.eval_dir(a.workdir[0])}")


if __name__ == "__main__":
  main()
