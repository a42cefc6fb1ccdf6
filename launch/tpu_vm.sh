#!/usr/bin/env bash
# Run minilm-distill on a Cloud TPU VM: one host or a multi-host pod slice, on-demand or on a
# queued resource (--spot / --best-effort), optionally babysitting a preemptible node until the run
# finishes. Every worker runs the same command (--worker=all); rerunning it resumes from the gs://
# workdir. See --help. Sticks to bash 3.2 features (macOS's /bin/bash), though only tested on bash 5.
set -euo pipefail

PROG=tpu_vm.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] -- [minilm-distill args...]

Create (or reuse) a Cloud TPU VM, install this project on every worker and run
  minilm-distill --config CONFIG --workdir gs://... [args...]
on all workers at once (gcloud ... ssh --worker=all). Rerunning resumes from the workdir.

Required:
  --name NAME            TPU VM (node) name
  --zone ZONE            e.g. us-central2-b
  --workdir gs://B/DIR   checkpoints live here; must be a gs:// path (workers are disposable)
  --config configs/X.py  config file, relative to the installed checkout

Options:
  --accelerator TYPE     accelerator type (default v4-8; a pod slice such as v4-32 works the same)
  --version RUNTIME      TPU software version (default tpu-ubuntu2204-base)
  --project P            Google Cloud project (default: gcloud's configured project)
  --spot                 use a queued resource with Spot capacity
  --best-effort          use a queued resource at the best-effort tier (gcloud alpha)
  --repo URL_OR_PATH     what to install on the workers: a local git checkout (copied as a
                         tarball of its git ls-files) or a git URL (cloned, HEAD). Default: this
                         checkout
  --prepare              run minilm-prepare instead of minilm-distill (same arguments): tokenise
                         the config's corpus into its shards (data.cache_dir, default WORKDIR/cache)
                         on every worker, which split the work, ahead of the training run
  --babysit              keep the run alive: poll the node; when it is not READY (preempted,
                         terminated, gone) delete it, recreate it, reinstall and rerun; stop when
                         the run exits 0
  --poll-seconds N       babysit / wait poll interval (default 60)
  --max-restarts N       babysit gives up after N restarts (default 20)
  --dry-run              print the commands (prefixed by "+ ") and run nothing
  -h, --help             show this help

Options also accept --opt=VALUE. Everything after -- goes to minilm-distill unchanged.
EOF
}

die() {  # usage error: one line on stderr, exit 2
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  exit 2
}

fail() {  # runtime error
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  exit 1
}

log() { printf '[%s] %s: %s\n' "$(date -u +%FT%TZ)" "$PROG" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Options

NAME='' ZONE='' PROJECT='' TIER='' REPO='' WORKDIR='' CONFIG=''
ACCEL=v4-8 VERSION=tpu-ubuntu2204-base BABYSIT=0 POLL=60 MAX_RESTARTS=20 DRY_RUN=0 COMMAND=minilm-distill
EXTRA=()

set_opt() {  # set_opt --flag VALUE
  [[ $2 != --* ]] || die "$1 needs a value (got $2)"
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --accelerator) ACCEL=$2 ;;
    --version) VERSION=$2 ;;
    --project) PROJECT=$2 ;;
    --repo) REPO=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --config) CONFIG=$2 ;;
    --poll-seconds) POLL=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
  esac
}

set_tier() {
  [[ -z $TIER || $TIER == "$1" ]] || die "--spot and --best-effort are mutually exclusive"
  TIER=$1
}

while (($#)); do
  case $1 in
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --spot) set_tier spot ;;
    --best-effort) set_tier best-effort ;;
    --babysit) BABYSIT=1 ;;
    --prepare) COMMAND=minilm-prepare ;;
    --dry-run) DRY_RUN=1 ;;
    --name | --zone | --accelerator | --version | --project | --repo | --workdir | --config | \
      --poll-seconds | --max-restarts)
      (($# >= 2)) || die "$1 needs a value"
      set_opt "$1" "$2"
      shift ;;
    --name=* | --zone=* | --accelerator=* | --version=* | --project=* | --repo=* | --workdir=* | \
      --config=* | --poll-seconds=* | --max-restarts=*)
      set_opt "${1%%=*}" "${1#*=}" ;;
    *) die "unknown option $1 (minilm-distill arguments go after --; see --help)" ;;
  esac
  shift
done

[[ -n $NAME ]] || die "missing --name (the TPU VM name)"
[[ -n $ZONE ]] || die "missing --zone"
[[ -n $WORKDIR ]] || die "missing --workdir (a gs:// path)"
[[ -n $CONFIG ]] || die "missing --config (e.g. configs/demo.py)"
[[ $WORKDIR == gs://?* ]] ||
  die "--workdir must be a gs:// path, got '$WORKDIR': TPU workers are deleted on preemption, so checkpoints must live in Cloud Storage"
if ! [[ $POLL =~ ^[0-9]+$ ]] || ((10#$POLL < 1)); then
  die "--poll-seconds must be a positive integer, got '$POLL'"
fi
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '$MAX_RESTARTS'"

# What to install: a local checkout (tarball + scp) or a git URL (cloned on the workers).
SRC=
if [[ -z $REPO ]]; then
  SRC=$ROOT
elif [[ -d $REPO ]]; then
  SRC=$(cd "$REPO" && pwd)
fi
if [[ -n $SRC ]]; then
  [[ -f $SRC/$CONFIG ]] || die "--config $CONFIG not found in $SRC"
  [[ -f $SRC/pyproject.toml || -f $SRC/setup.py || -f $SRC/setup.cfg ]] ||
    die "$SRC is not a Python project checkout"
fi

# ---------------------------------------------------------------------------------------------
# Commands (one place; the real run and --dry-run print the same arrays)

LOC=(--zone "$ZONE")
[[ -z $PROJECT ]] || LOC+=(--project "$PROJECT")

TPU=(gcloud compute tpus tpu-vm)
if [[ $TIER == best-effort ]]; then
  QRG=(gcloud alpha compute tpus queued-resources)  # --best-effort is alpha-only in gcloud
else
  QRG=(gcloud compute tpus queued-resources)
fi
QR=$NAME-qr
USE_QR=0
[[ -z $TIER ]] || USE_QR=1

TMP=${TMPDIR:-/tmp}
TGZ=${TMP%/}/minilm_jax-$NAME.tar.gz

CMD_DESCRIBE=("${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')
CMD_QR_DESCRIBE=("${QRG[@]}" describe "$QR" "${LOC[@]}" --format='value(state.state)')
if ((USE_QR)); then
  CMD_CREATE=("${QRG[@]}" create "$QR" --node-id "$NAME" "${LOC[@]}" --accelerator-type "$ACCEL"
    --runtime-version "$VERSION" "--$TIER")
  CMD_DELETE=("${QRG[@]}" delete "$QR" "${LOC[@]}" --force --quiet)  # --force: the node too
else
  CMD_CREATE=("${TPU[@]}" create "$NAME" "${LOC[@]}" --accelerator-type "$ACCEL" --version "$VERSION")
  CMD_DELETE=("${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet)
fi
CMD_SCP=("${TPU[@]}" scp "$TGZ" "$NAME:minilm_jax.tar.gz" "${LOC[@]}" --worker=all)

# Worker-side install into ~/minilm_jax (an existing ~/minilm_jax/.venv is kept). jax>=0.10 needs
# Python >= 3.11 and the TPU images ship 3.10, so without a recent python3 uv provides 3.12.
if [[ -n $SRC ]]; then
  FETCH='tar -xzf ~/minilm_jax.tar.gz'
else
  FETCH="git init -q . && git fetch -q --depth 1 $(printf %q "$REPO") HEAD && git checkout -q FETCH_HEAD"
fi
REMOTE_INSTALL="set -e; mkdir -p minilm_jax; cd minilm_jax; find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; $FETCH; \
if [ ! -x .venv/bin/pip ]; then \
if python3 -c \"import sys; sys.exit(sys.version_info < (3, 11))\" && python3 -m venv .venv; then :; \
else rm -rf .venv; PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv; ~/.local/bin/uv venv -q --seed --python 3.12 .venv; fi; fi; \
.venv/bin/pip install -q -e \".[gcs]\"; .venv/bin/pip install -q -U \"jax[tpu]\""
CMD_INSTALL=("${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$REMOTE_INSTALL")

# TPU_ACCELERATOR_TYPE: minilm_jax.xla_flags sets the XLA:TPU flags of this generation (libtpu reads the same).
REMOTE_RUN="cd minilm_jax && TPU_ACCELERATOR_TYPE=$(printf %q "$ACCEL") .venv/bin/$COMMAND"
for a in --config "$CONFIG" --workdir "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}; do
  REMOTE_RUN+=" $(printf %q "$a")"
done
CMD_RUN=("${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$REMOTE_RUN")

# ---------------------------------------------------------------------------------------------
# Printing and running

quote() {  # readable shell quoting of one word, for the printed commands
  local w=$1 safe='^[A-Za-z0-9_@%+=:,./-]+$' flag='^(--[A-Za-z0-9-]+=)(.*)$' q="'\\''"
  if [[ $w =~ $safe ]]; then
    printf '%s' "$w"
  elif [[ $w =~ $flag ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${w//\'/$q}"
  fi
}

show() {  # print "+ cmd args..." on stdout
  local line='+' w
  for w in "$@"; do line+=" $(quote "$w")"; done
  printf '%s\n' "$line"
}

note() { printf '# %s\n' "$*"; }

TARBALL_LINE="+ git -C $(quote "$SRC") ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$TGZ") -C $(quote "$SRC") --null -T -"

make_tarball() {  # files tracked or untracked-but-not-ignored; tracked files deleted on disk are skipped
  printf '%s\n' "$TARBALL_LINE" >&2
  git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1 || fail "$SRC is not a git checkout"
  git -C "$SRC" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      if [[ -e $SRC/$f ]]; then printf '%s\0' "$f"; fi
    done |
    tar -czf "$TGZ" -C "$SRC" --null -T -
}

runv() {  # echo to stderr, then run
  show "$@" >&2
  "$@"
}

# ---------------------------------------------------------------------------------------------
# --dry-run: the same commands in the order a run issues them (polls shown once)

if ((DRY_RUN)); then
  print_bringup() {  # $1 = 1 to delete first
    if (($1)); then show "${CMD_DELETE[@]}"; fi
    show "${CMD_CREATE[@]}"
    if ((USE_QR)); then
      note "poll every $POLL s until ACTIVE, then until the node is READY:"
      show "${CMD_QR_DESCRIBE[@]}"
      show "${CMD_DESCRIBE[@]}"
    fi
    if [[ -n $SRC ]]; then show "${CMD_SCP[@]}"; fi
    show "${CMD_INSTALL[@]}"
  }
  if [[ -n $SRC ]]; then printf '%s\n' "$TARBALL_LINE"; fi
  show "${CMD_DESCRIBE[@]}"
  note "READY: reuse the node (reinstall, run); missing: create it; any other state: delete it first"
  print_bringup 0
  show "${CMD_RUN[@]}"
  if ((BABYSIT)); then
    note "babysit: every $POLL s while the run goes on, and after it exits non-zero:"
    show "${CMD_DESCRIBE[@]}"
    note "not READY (PREEMPTED, TERMINATED, missing): delete, recreate, reinstall, rerun (it resumes from $WORKDIR); at most $MAX_RESTARTS restarts"
    print_bringup 1
    show "${CMD_RUN[@]}"
    note "stop when the run exits 0"
  fi
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Real run

command -v gcloud >/dev/null || fail "gcloud not found: install the Google Cloud CLI and run 'gcloud auth login'"

ERRFILE=$(mktemp "${TMP%/}/tpu_vm.XXXXXX")
RUN_PID=
BUILT_TGZ=0
cleanup() {
  if [[ -n $RUN_PID ]]; then kill -TERM -- "-$RUN_PID" 2>/dev/null || true; fi
  rm -f "$ERRFILE"
  if ((BUILT_TGZ)); then rm -f "$TGZ"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

state_of() {  # state_of CMD...: prints the describe value, MISSING, or UNKNOWN (other errors)
  local out
  if out=$("$@" 2>"$ERRFILE"); then
    printf '%s\n' "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$ERRFILE"; then
    echo MISSING
  else
    echo UNKNOWN
  fi
}

wait_qr_active() {
  local s
  while :; do
    s=$(state_of "${CMD_QR_DESCRIBE[@]}")
    case $s in
      ACTIVE) return 0 ;;
      ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING | UNKNOWN) log "queued resource $QR: $s" ;;
      *) log "queued resource $QR: $s"; return 1 ;;
    esac
    sleep "$POLL"
  done
}

wait_node_ready() {
  local s
  while :; do
    s=$(state_of "${CMD_DESCRIBE[@]}")
    case $s in
      READY) log "node $NAME is READY"; return 0 ;;
      CREATING | STARTING | RESTARTING | REPAIRING | UNKNOWN) log "node $NAME: $s" ;;
      MISSING) if ((USE_QR)); then log "node $NAME: not there yet"; else log "node $NAME: missing"; return 1; fi ;;
      *) log "node $NAME: $s"; return 1 ;;
    esac
    sleep "$POLL"
  done
}

CREATED=0
ensure_node() {  # get a READY node; sets CREATED=1 when it had to (re)create it
  local s q
  CREATED=0
  s=$(state_of "${CMD_DESCRIBE[@]}")
  case $s in
    READY) log "node $NAME is READY: reusing it"; return 0 ;;
    UNKNOWN) log "cannot describe node $NAME: $(tr '\n' ' ' <"$ERRFILE")"; return 1 ;;
  esac
  log "node $NAME: $s"
  CREATED=1
  if ((USE_QR)); then
    q=$(state_of "${CMD_QR_DESCRIBE[@]}")
    case $q in
      ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING) log "queued resource $QR: $q: waiting" ;;
      MISSING) runv "${CMD_CREATE[@]}" || return 1 ;;
      *) runv "${CMD_DELETE[@]}" || log "delete failed (continuing)"; runv "${CMD_CREATE[@]}" || return 1 ;;
    esac
    wait_qr_active || return 1
  else
    case $s in
      MISSING) runv "${CMD_CREATE[@]}" || return 1 ;;
      CREATING | STARTING) ;;
      *) runv "${CMD_DELETE[@]}" || log "delete failed (continuing)"; runv "${CMD_CREATE[@]}" || return 1 ;;
    esac
  fi
  wait_node_ready
}

install() {
  if [[ -n $SRC ]]; then runv "${CMD_SCP[@]}" || return 1; fi
  runv "${CMD_INSTALL[@]}"
}

sleep_while_alive() {  # sleep_while_alive PID SECONDS: returns 1 as soon as PID has exited
  local n=$2
  while ((n > 0)); do
    kill -0 "$1" 2>/dev/null || return 1
    sleep 1
    n=$((n - 1))
  done
  kill -0 "$1" 2>/dev/null
}

run_watched() {  # run CMD_RUN in its own process group; stop it if the node stops being READY
  local s rc=0
  show "${CMD_RUN[@]}" >&2
  set -m
  "${CMD_RUN[@]}" &
  RUN_PID=$!
  set +m
  while sleep_while_alive "$RUN_PID" "$POLL"; do
    s=$(state_of "${CMD_DESCRIBE[@]}")
    case $s in
      READY | UNKNOWN) ;;
      *) log "node $NAME is $s: stopping the run"; kill -TERM -- "-$RUN_PID" 2>/dev/null || true; break ;;
    esac
  done
  wait "$RUN_PID" || rc=$?
  RUN_PID=
  return "$rc"
}

if [[ -n $SRC ]]; then
  make_tarball
  BUILT_TGZ=1  # built once: every restart installs the same code
fi

still_up() { log "the TPU VM is still up (and billed); delete it with: $(show "${CMD_DELETE[@]}" | cut -c3-)"; }

if ((!BABYSIT)); then
  ensure_node || fail "could not get a READY TPU VM $NAME"
  install || fail "installing on $NAME failed"
  rc=0
  runv "${CMD_RUN[@]}" || rc=$?
  still_up
  exit "$rc"
fi

restarts=0
need_install=1
while :; do
  rc=0
  if ensure_node; then
    if ((CREATED)); then need_install=1; fi
    if ((need_install)) && ! install; then
      rc=1
      log "install failed"
    else
      need_install=0
      if run_watched; then
        log "run finished (exit 0) after $restarts restart(s)"
        still_up
        exit 0
      else
        rc=$?
        log "run exited with status $rc"
      fi
    fi
  else
    rc=1
  fi
  restarts=$((restarts + 1))
  if ((restarts > MAX_RESTARTS)); then
    fail "giving up after $MAX_RESTARTS restarts (last status $rc)"
  fi
  log "restart $restarts/$MAX_RESTARTS in $POLL s"
  sleep "$POLL"
done
