"""`minilm-distill --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]`.

Flags only: the logic lives in train.py. Running the same command again resumes from DIR's latest
checkpoint. Errors print one line and exit non-zero; --verbose shows the traceback.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override keys with "
                                          "--config.KEY=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the student go; rerun "
                               "with the same workdir to resume.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks on errors.")


def _fail(prog: str, e: BaseException) -> None:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  print(f"{prog}: error: {msg}", file=sys.stderr)
  sys.exit(2)


def _distill(argv):
  if len(argv) > 1:
    _fail("minilm-distill", ValueError(f"unexpected arguments: {' '.join(argv[1:])}"))
  if _CONFIG.value is None or not _WORKDIR.value:
    _fail("minilm-distill", ValueError("--config and --workdir are required (see --help)"))
  from absl import logging
  logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)  # Orbax is chatty at INFO
  from minilm_jax import train
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError) as e:
    if _VERBOSE.value:
      raise
    _fail("minilm-distill", e)
  if summary.get("last"):
    print(f"final loss {summary['last']['loss']:.5f} at step {summary['step']}")


def main():
  if any(a in ("-h", "--help", "--helpshort") for a in sys.argv[1:]):
    flags.FLAGS.mark_as_parsed()
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl's own --help exits 1
  app.run(_distill)


if __name__ == "__main__":
  main()
