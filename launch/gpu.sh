#!/usr/bin/env bash
# Run minilm-distill on this machine's NVIDIA GPU(s): make a venv if missing, install the project and
# the CUDA JAX wheels, check that JAX sees a GPU, then run. See --help.
set -euo pipefail

PROG=gpu.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [--cuda 12|13] [--venv DIR] [--skip-install] [--dry-run] -- [minilm-distill args...]

  --cuda 12|13     CUDA wheels to install: pip install -U "jax[cuda12]" (default) or "jax[cuda13]"
                   (they bring their own CUDA libraries; you need an NVIDIA driver new enough for them)
  --venv DIR       virtual environment to use, created if missing (default: .venv in the checkout)
  --skip-install   reuse the venv as it is (no pip); e.g. when resuming on a machine without network
  --dry-run        print the commands (prefixed by "+ ") and run nothing
  -h, --help       show this help

Example:
  launch/gpu.sh -- --config configs/demo.py --workdir workdirs/demo

The environment passes through: XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates 75% of GPU memory
by default; e.g. 0.5 to share the GPU), CUDA_VISIBLE_DEVICES, and PYTHON (the interpreter that creates
the venv; jax needs Python >= 3.11). Rerunning with the same --workdir resumes.
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  exit 2
}

CUDA=12 VENV=$ROOT/.venv DRY_RUN=0 SKIP_INSTALL=0
PYTHON=${PYTHON:-python3}
ARGS=()

while (($#)); do
  case $1 in
    --) shift; ARGS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --cuda | --venv)
      (($# >= 2)) || die "$1 needs a value"
      if [[ $1 == --cuda ]]; then CUDA=$2; else VENV=$2; fi
      shift ;;
    --cuda=*) CUDA=${1#*=} ;;
    --venv=*) VENV=${1#*=} ;;
    *) die "unknown option $1 (minilm-distill arguments go after --; see --help)" ;;
  esac
  shift
done

[[ $CUDA == 12 || $CUDA == 13 ]] || die "--cuda must be 12 or 13, got '$CUDA'"
((${#ARGS[@]})) || die "nothing to run: pass minilm-distill arguments after --, e.g. -- --config configs/demo.py --workdir workdirs/demo"
[[ -n $VENV ]] || die "--venv needs a directory"

quote() {  # readable shell quoting of one word, for the printed commands
  local w=$1 safe='^[A-Za-z0-9_@%+=:,./-]+$' q="'\\''"
  if [[ $w =~ $safe ]]; then printf '%s' "$w"; else printf "'%s'" "${w//\'/$q}"; fi
}

show() {
  local line='+' w
  for w in "$@"; do line+=" $(quote "$w")"; done
  printf '%s\n' "$line"
}

CMD_VENV=("$PYTHON" -m venv "$VENV")
CMD_PROJECT=("$VENV/bin/pip" install -e "$ROOT")
CMD_JAX=("$VENV/bin/pip" install -U "jax[cuda$CUDA]")
CMD_CHECK=("$VENV/bin/python" -c 'import jax; assert jax.default_backend()=="gpu"')
CMD_RUN=("$VENV/bin/minilm-distill" "${ARGS[@]}")

NEED_VENV=0
[[ -x $VENV/bin/python ]] || NEED_VENV=1
((!SKIP_INSTALL || !NEED_VENV)) || die "--skip-install: no venv at $VENV"

if ((DRY_RUN)); then
  if ((NEED_VENV)); then show "${CMD_VENV[@]}"; fi
  if ((!SKIP_INSTALL)); then
    show "${CMD_PROJECT[@]}"
    show "${CMD_JAX[@]}"
  fi
  show "${CMD_CHECK[@]}"
  if [[ -n ${XLA_PYTHON_CLIENT_MEM_FRACTION:-} ]]; then
    printf '# XLA_PYTHON_CLIENT_MEM_FRACTION=%s (from the environment)\n' "$XLA_PYTHON_CLIENT_MEM_FRACTION"
  fi
  show "${CMD_RUN[@]}"
  exit 0
fi

runv() {
  show "$@" >&2
  "$@"
}

if ((NEED_VENV)); then
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set PYTHON to a Python >= 3.11"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); jax needs >= 3.11 (set PYTHON=python3.12, say)"
  runv "${CMD_VENV[@]}"
fi
if ((!SKIP_INSTALL)); then
  runv "${CMD_PROJECT[@]}"
  runv "${CMD_JAX[@]}"
fi

show "${CMD_CHECK[@]}" >&2
if ! err=$("${CMD_CHECK[@]}" 2>&1); then
  # keep JAX's own explanation (e.g. "CUDA-enabled jaxlib is installed, but no GPU ..."), not the traceback
  hints=$(printf '%s\n' "$err" | grep -vE '^(Traceback|  |AssertionError)' || true)
  [[ -z $hints ]] || printf '%s\n' "$hints" >&2
  printf '%s: error: JAX sees no GPU (backend: %s). Check nvidia-smi, that the NVIDIA driver is new enough for the CUDA %s wheels, and CUDA_VISIBLE_DEVICES.\n' \
    "$PROG" "$("$VENV/bin/python" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)" "$CUDA" >&2
  exit 1
fi

show "${CMD_RUN[@]}" >&2
exec "${CMD_RUN[@]}"
