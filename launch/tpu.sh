#!/usr/bin/env bash
# launch/tpu.sh: run one `sdpo-train --config ...` on every worker of a Cloud TPU VM or pod slice.
#
# Steps: create the TPU (tpu-vm create, or a queued resource with --queued; --reuse keeps an
# existing healthy one), wait until it is READY / ACTIVE, ship this repository (git archive of
# --ref, default HEAD: uncommitted changes do not travel) to every worker, install it there
# (a uv-made Python 3.12 venv, `pip install -e . jax[tpu]`), mount a gs:// --output-dir's bucket
# with Cloud Storage FUSE on every worker, run the same sdpo-train command on all workers
# (--worker=all; JAX's multi-host runtime finds its peers from the TPU metadata), copy each
# worker's log back to logs/<name>/worker-<i>.log, and optionally delete the TPU.
#
# Every command goes through run(): with --dry-run it is printed (one per line, shell-quoted,
# copy-pasteable; '#' lines are comments) instead of executed, and gcloud is not needed.
# Usage errors: one line on stderr, exit status 2. Run `launch/tpu.sh --help` for the flags.
#
# Spot / preemptible: see launch/README.md. In short, keep --output-dir on persistent storage
# (a gs:// bucket, which every worker mounts) and rerun the same command with --reuse after a
# preemption: the preempted node is deleted and recreated, and sdpo-train resumes from
# <output_dir>/checkpoints.
set -euo pipefail

PROG=tpu.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh --name NAME --zone ZONE --project PROJECT --type ACCELERATOR_TYPE
                     --config PATH --output-dir DIR [options] [-- SDPO_TRAIN_ARGS...]

Required (flag or environment variable):
  --name NAME            TPU / queued-resource name                       TPU_NAME
  --zone ZONE            e.g. us-central2-b                               TPU_ZONE
  --project PROJECT      GCP project id                                   GCP_PROJECT
  --type TYPE            accelerator type: v4-32, v5p-64, v5litepod-16... TPU_TYPE
  --config PATH          sdpo-train config, relative to the repo root     SDPO_CONFIG
                         (a worker-side absolute path is passed unchanged)
  --output-dir DIR       the run folder; use gs://BUCKET/PATH so that the SDPO_OUTPUT_DIR
                         run outlives the VM (resume after preemption): every
                         worker mounts BUCKET at ~/gcs/BUCKET with gcsfuse and
                         sdpo-train gets --config.output_dir=~/gcs/BUCKET/PATH;
                         an absolute worker path is passed unchanged
Options:
  --version V            TPU runtime version (default from the type)      TPU_VERSION
  --spot | --preemptible spot / preemptible capacity (--queued: spot only) TPU_SPOT=1 / TPU_PREEMPTIBLE=1
  --queued               create through `queued-resources create`         TPU_QUEUED=1
  --reuse                keep NAME if it exists and is healthy (a PREEMPTED/
                         SUSPENDED/FAILED one is deleted and recreated)    TPU_REUSE=1
  --extra "ARGS"         extra sdpo-train args, whitespace-split, e.g.    SDPO_EXTRA
                         "--config.train.learning_rate=1e-6 --config.seed=1"
                         (args after `--` are passed verbatim, spaces kept)
  --num-workers N        hosts in the slice (default from the type)       TPU_NUM_WORKERS
  --create-args "ARGS"   extra gcloud create flags, whitespace-split,     TPU_CREATE_ARGS
                         e.g. "--network=my-net --reserved"
  --ref REF              git ref shipped to the workers (default HEAD)    SDPO_GIT_REF
  --python VERSION       worker Python made by uv (default 3.12)          TPU_PYTHON
  --no-install           skip copy + install (workers already set up)     TPU_NO_INSTALL=1
  --log-dir DIR          local log folder (default logs/NAME)             LOG_DIR
  --poll SECONDS         state poll interval (default 30)                 TPU_POLL
  --wait-timeout SECONDS give up waiting for READY/ACTIVE (default 21600) TPU_WAIT_TIMEOUT
  --delete-after         delete the TPU when the script exits             TPU_DELETE_AFTER=1
  --dry-run              print every command instead of running it        DRY_RUN=1
  -h, --help             this text
EOF
}

fail() { # runtime failure after the checks: exit 1
  echo "$PROG: $*" >&2
  exit 1
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# tpu_hosts TYPE: number of TPU VM hosts (gcloud workers) of an accelerator type. From the
# Cloud TPU system-architecture pages:
#   type          the number counts     per host          hosts            examples
#   v2-N, v3-N    TensorCores (2/chip)  4 chips = 8 cores N/8              v3-8: 1, v3-32: 4
#   v4-N          TensorCores (2/chip)  4 chips = 8 cores N/8              v4-8: 1, v4-32: 4
#   v5p-N         TensorCores (2/chip)  4 chips = 8 cores N/8              v5p-8: 1, v5p-64: 8
#   v5litepod-N   chips (1 core/chip)   up to 8 (single host), else 4      N<=8: 1, else N/4
#   v6e-N         chips (1 core/chip)   up to 8 (single host), else 4      v6e-16: 4, v6e-256: 64
# (v5litepod-16: 4 VMs, -32: 8, -64: 16, -128: 32, -256: 64.) Other types: pass --num-workers.
tpu_hosts() {
  local t=$1 gen n
  gen=${t%-*}
  n=${t##*-}
  [[ $t == *-* && $n =~ ^[0-9]+$ ]] || return 1
  case $gen in
    v2 | v3 | v4 | v5p)
      ((n >= 8 && n % 8 == 0)) || return 1
      echo $((n / 8))
      ;;
    v5litepod | v6e)
      if ((n >= 1 && n <= 8)); then
        echo 1
      elif ((n % 4 == 0)); then
        echo $((n / 4))
      else
        return 1
      fi
      ;;
    *) return 1 ;;
  esac
}

# default_version TYPE: the TPU VM runtime (software) version the Cloud TPU docs give for JAX.
default_version() {
  case ${1%-*} in
    v2 | v3 | v4) echo tpu-ubuntu2204-base ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# ---- flags (each defaults to its environment variable) -------------------------------------
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${GCP_PROJECT:-}
TYPE=${TPU_TYPE:-}
VERSION=${TPU_VERSION:-}
CONFIG=${SDPO_CONFIG:-}
OUTPUT_DIR=${SDPO_OUTPUT_DIR:-}
SPOT=${TPU_SPOT:-0}
PREEMPTIBLE=${TPU_PREEMPTIBLE:-0}
QUEUED=${TPU_QUEUED:-0}
REUSE=${TPU_REUSE:-0}
EXTRA_STR=${SDPO_EXTRA:-}
NUM_WORKERS=${TPU_NUM_WORKERS:-}
CREATE_STR=${TPU_CREATE_ARGS:-}
REF=${SDPO_GIT_REF:-HEAD}
PYVER=${TPU_PYTHON:-3.12}
NO_INSTALL=${TPU_NO_INSTALL:-0}
LOG_DIR=${LOG_DIR:-}
POLL=${TPU_POLL:-30}
WAIT_TIMEOUT=${TPU_WAIT_TIMEOUT:-21600}
DELETE_AFTER=${TPU_DELETE_AFTER:-0}
DRY_RUN=${DRY_RUN:-0}
PASSTHROUGH=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --output-dir) need_value "$@"; OUTPUT_DIR=$2; shift 2 ;;
    --extra) need_value "$@"; EXTRA_STR="$EXTRA_STR $2"; shift 2 ;;
    --num-workers) need_value "$@"; NUM_WORKERS=$2; shift 2 ;;
    --create-args) need_value "$@"; CREATE_STR="$CREATE_STR $2"; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --python) need_value "$@"; PYVER=$2; shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
    --poll) need_value "$@"; POLL=$2; shift 2 ;;
    --wait-timeout) need_value "$@"; WAIT_TIMEOUT=$2; shift 2 ;;
    --name=* | --zone=* | --project=* | --type=* | --version=* | --config=* | --output-dir=* | \
      --extra=* | --num-workers=* | --create-args=* | --ref=* | --python=* | --log-dir=* | \
      --poll=* | --wait-timeout=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --reuse) REUSE=1; shift ;;
    --no-install) NO_INSTALL=1; shift ;;
    --delete-after) DELETE_AFTER=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; PASSTHROUGH=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# ---- checks ---------------------------------------------------------------------------------
[[ -n $NAME ]] || die "missing --name (or TPU_NAME)"
[[ -n $ZONE ]] || die "missing --zone (or TPU_ZONE)"
[[ -n $PROJECT ]] || die "missing --project (or GCP_PROJECT)"
[[ -n $TYPE ]] || die "missing --type (or TPU_TYPE), e.g. v4-32, v5p-64, v5litepod-16"
[[ -n $CONFIG ]] || die "missing --config (or SDPO_CONFIG)"
[[ -n $OUTPUT_DIR ]] || die "missing --output-dir (or SDPO_OUTPUT_DIR), e.g. gs://BUCKET/runs/NAME"
name_re='^[a-z]([-a-z0-9]*[a-z0-9])?$'
[[ $NAME =~ $name_re ]] ||
  die "--name '$NAME': lowercase letters, digits and '-', starting with a letter"
for v in SPOT PREEMPTIBLE QUEUED REUSE NO_INSTALL DELETE_AFTER DRY_RUN; do
  [[ ${!v} == 0 || ${!v} == 1 ]] || die "$v must be 0 or 1, got '${!v}'"
done
[[ $SPOT == 1 && $PREEMPTIBLE == 1 ]] && die "--spot and --preemptible are exclusive"
[[ $QUEUED == 1 && $PREEMPTIBLE == 1 ]] &&
  die "queued resources take --spot, not --preemptible"
if [[ -z $NUM_WORKERS ]]; then
  NUM_WORKERS=$(tpu_hosts "$TYPE") ||
    die "unknown accelerator type '$TYPE' (known: v2/v3/v4/v5p-N, v5litepod-N, v6e-N); pass --num-workers"
fi
[[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive integer, got '$NUM_WORKERS'"
if [[ -z $VERSION ]]; then
  VERSION=$(default_version "$TYPE") || die "no default runtime for '$TYPE'; pass --version"
fi
[[ $POLL =~ ^[1-9][0-9]*$ ]] || die "--poll must be a positive integer, got '$POLL'"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--wait-timeout must be an integer, got '$WAIT_TIMEOUT'"
[[ $OUTPUT_DIR == gs://* || $OUTPUT_DIR == /* ]] ||
  die "--output-dir '$OUTPUT_DIR' must be gs://BUCKET/PATH or an absolute worker path"
# A gs:// run folder is used through a Cloud Storage FUSE mount: sdpo-train writes its run files
# (config.json, metrics.jsonl, reports, plots, TensorBoard events, reference caches) with local
# file I/O, so it gets the mounted path. BUCKET is mounted at ~/gcs/BUCKET on every worker.
BUCKET=""
WORKER_OUT=$OUTPUT_DIR # what sdpo-train gets; relative to the worker's home for a bucket
if [[ $OUTPUT_DIR == gs://* ]]; then
  BUCKET=${OUTPUT_DIR#gs://}
  BUCKET=${BUCKET%%/*}
  bucket_re='^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$'
  [[ $BUCKET =~ $bucket_re ]] ||
    die "--output-dir '$OUTPUT_DIR': '$BUCKET' is not a bucket name (lowercase letters, digits, '-', '_', '.')"
  sub=${OUTPUT_DIR#gs://"$BUCKET"}
  while [[ $sub == */ ]]; do sub=${sub%/}; done
  WORKER_OUT=gcs/$BUCKET$sub
fi
if [[ $CONFIG != /* ]]; then # shipped with the repo: it must exist here (ml_collections 'path:arg' ok)
  [[ -f $REPO_ROOT/${CONFIG%%:*} ]] || die "--config '$CONFIG' is not a file under $REPO_ROOT"
fi
EXTRA=()
CREATE_ARGS=()
read -r -a EXTRA <<<"$EXTRA_STR" || true
read -r -a CREATE_ARGS <<<"$CREATE_STR" || true
EXTRA+=(${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
LOG_DIR=${LOG_DIR:-logs/$NAME}

exec 3>&1 # run() prints dry-run lines here, also from inside $(...)

if [[ -z $BUCKET ]]; then
  note "warning: --output-dir '$OUTPUT_DIR' is not gs://: unless it is a shared mount, each worker" \
    "writes to its own disk, multi-host checkpoints need shared storage, and nothing survives deleting the VM"
fi

G=(--zone="$ZONE" --project="$PROJECT" --quiet) # on every gcloud call
TPUVM=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
if [[ $QUEUED == 1 ]]; then
  API=("${QR[@]}") STATE_FIELD=state.state READY_STATE=ACTIVE
  BAD_STATES=" FAILED SUSPENDED SUSPENDING DELETING "
  DELETE_EXTRA=(--force) # also deletes the node
else
  API=("${TPUVM[@]}") STATE_FIELD=state READY_STATE=READY
  BAD_STATES=" PREEMPTED TERMINATED STOPPED STOPPING DELETING "
  DELETE_EXTRA=()
fi
REMOTE_LOG=sdpo_logs/$NAME.log # on each worker, relative to the home folder
PROVISIONED=0

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if [[ $DELETE_AFTER == 1 && $PROVISIONED == 1 ]]; then
    note "--delete-after: deleting $NAME"
    run "${API[@]}" delete "$NAME" "${G[@]}" ${DELETE_EXTRA[@]+"${DELETE_EXTRA[@]}"} ||
      echo "$PROG: delete failed; delete $NAME by hand" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT

note "$NAME: $TYPE ($NUM_WORKERS worker(s)), runtime $VERSION, zone $ZONE, project $PROJECT"

# ---- 1. create, or reuse ----------------------------------------------------------------------
create() {
  local cap=()
  if [[ $SPOT == 1 ]]; then cap=(--spot); elif [[ $PREEMPTIBLE == 1 ]]; then cap=(--preemptible); fi
  if [[ $QUEUED == 1 ]]; then
    run "${QR[@]}" create "$NAME" "${G[@]}" --node-id="$NAME" --accelerator-type="$TYPE" \
      --runtime-version="$VERSION" ${cap[@]+"${cap[@]}"} ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
  else
    run "${TPUVM[@]}" create "$NAME" "${G[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" ${cap[@]+"${cap[@]}"} ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
  fi
}

describe_state() {
  run "${API[@]}" describe "$NAME" "${G[@]}" --format="value($STATE_FIELD)"
}

if [[ $REUSE == 1 ]]; then
  state=$(describe_state 2>/dev/null) || state=""
  if [[ $DRY_RUN == 1 ]]; then
    note "--reuse: the create is skipped when the describe above shows $NAME;" \
      "a missing one is created, one in$BAD_STATES""is deleted and recreated"
  elif [[ -z $state ]]; then
    note "$NAME not found: creating it"
    create
  elif [[ $BAD_STATES == *" $state "* ]]; then
    note "$NAME is $state: deleting and recreating it (the run resumes from its checkpoints)"
    run "${API[@]}" delete "$NAME" "${G[@]}" ${DELETE_EXTRA[@]+"${DELETE_EXTRA[@]}"}
    create
  else
    note "reusing $NAME (state $state)"
  fi
else
  create
fi
PROVISIONED=1 # from here on, --delete-after cleans up (also after a failure)

# ---- 2. wait until READY (tpu-vm) / ACTIVE (queued resource) --------------------------------
if [[ $DRY_RUN == 1 ]]; then
  describe_state
  note "(repeated every ${POLL}s until it prints $READY_STATE; fails on$BAD_STATES""or after ${WAIT_TIMEOUT}s)"
else
  start=$SECONDS
  while :; do
    state=$(describe_state) || state=UNKNOWN
    [[ $state == "$READY_STATE" ]] && break
    [[ $BAD_STATES == *" $state "* ]] && fail "$NAME is $state"
    ((WAIT_TIMEOUT == 0 || SECONDS - start < WAIT_TIMEOUT)) ||
      fail "$NAME not $READY_STATE after ${WAIT_TIMEOUT}s (state $state)"
    note "$NAME is ${state:-UNKNOWN}; waiting for $READY_STATE"
    sleep "$POLL"
  done
fi
if [[ $DRY_RUN != 1 ]]; then # the node itself knows its worker count: prefer it to the table
  n=$(run "${TPUVM[@]}" describe "$NAME" "${G[@]}" --format='value(networkEndpoints.len())') || n=""
  if [[ $n =~ ^[1-9][0-9]*$ && $n != "$NUM_WORKERS" ]]; then
    note "$NAME has $n workers (expected $NUM_WORKERS for $TYPE): using $n"
    NUM_WORKERS=$n
  fi
fi

run mkdir -p "$LOG_DIR"

# ---- 3. copy the repository and install it on every worker; mount the bucket ----------------
# home_path REL: sets REPLY to the worker-side shell word for ~/REL ("$HOME" expands there).
home_path() {
  shq "$1"
  REPLY="\"\$HOME\"/$REPLY"
}

# mount_command: sets REPLY to the worker-side command that mounts gs://$BUCKET at ~/gcs/$BUCKET
# with Cloud Storage FUSE, then creates the run folder on it (an early check that this VM may
# write to the bucket). Idempotent: a mounted folder is left alone, and gcsfuse is installed only
# where it is missing, by Google's apt route for Debian/Ubuntu (TPU VM images are Ubuntu):
# https://cloud.google.com/storage/docs/cloud-storage-fuse/install (repository gcsfuse-CODENAME,
# key in /usr/share/keyrings/cloud.google.asc). Mount flags:
#   --implicit-dirs           folders that exist only as object-name prefixes (a run folder
#                             copied with `gcloud storage cp`, or written without gcsfuse) show up
#   --rename-dir-limit=N      Orbax commits a checkpoint by renaming its temporary folder, and
#                             gcsfuse renames a folder only when it has fewer than N descendants
#                             (default 0: never). On a flat bucket the rename moves object by
#                             object, so it is not atomic; a hierarchical-namespace bucket renames
#                             a folder atomically.
# No file cache (the default, no --cache-dir): the run reads back only its own small files.
# metrics.jsonl gets one row per logged step (open, append, close), and gcsfuse uploads the
# object again at each close (per its semantics doc, only the appended bytes once it is >= 2 MB):
# a few KiB per step at our logging rates, which is fine.
mount_command() {
  local key=/usr/share/keyrings/cloud.google.asc dir
  home_path "gcs/$BUCKET"
  dir=$REPLY
  local m="set -eo pipefail; if ! command -v gcsfuse >/dev/null; then"
  m="$m echo \"deb [signed-by=$key] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\""
  m="$m | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  m="$m; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $key >/dev/null"
  m="$m; sudo apt-get update -q"
  m="$m; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 gcsfuse; fi"
  shq "$BUCKET"
  m="$m; if ! mountpoint -q $dir; then mkdir -p $dir"
  m="$m; gcsfuse --implicit-dirs --rename-dir-limit=1000000 $REPLY $dir; fi"
  home_path "$WORKER_OUT"
  REPLY="$m; mkdir -p $REPLY"
}

# The mount runs at the end of the install command, or, with --no-install, as its own step:
# always before training and never inside the training command, so that a failed install or
# mount stops the launch before sdpo-train starts, and its output stays out of the sdpo log.
MOUNT=""
if [[ -n $BUCKET ]]; then
  mount_command
  MOUNT=$REPLY
fi
if [[ $NO_INSTALL == 1 ]]; then
  note "--no-install: using the code and venv already on the workers"
  if [[ -n $MOUNT ]]; then # a recreated or rebooted worker has lost its mount: always (re)mount
    note "mounting gs://$BUCKET at ~/gcs/$BUCKET on every worker (kept if already mounted)"
    run "${TPUVM[@]}" ssh "$NAME" --worker=all "${G[@]}" --command="$MOUNT"
  fi
else
  if [[ $DRY_RUN != 1 && -n $(GIT_OPTIONAL_LOCKS=0 git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    note "warning: uncommitted changes are not shipped (git archive $REF)"
  fi
  TARBALL=${TMPDIR:-/tmp}/sdpo_jax-$NAME.tar.gz
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" "$REF"
  run "${TPUVM[@]}" scp "$TARBALL" "$NAME:sdpo_jax.tar.gz" --worker=all "${G[@]}"
  # TPU VM images ship Python 3.10 and jax needs >= 3.11: uv provides the interpreter.
  # shellcheck disable=SC2088 # the tilde is for the worker's shell
  UV='~/.local/bin/uv'
  SETUP="set -e; rm -rf sdpo_jax; mkdir -p sdpo_jax sdpo_logs"
  SETUP="$SETUP; tar -xzf sdpo_jax.tar.gz -C sdpo_jax"
  SETUP="$SETUP; python3 -m pip install --user --quiet --upgrade uv"
  shq "$PYVER"
  SETUP="$SETUP; $UV venv --allow-existing --python $REPLY sdpo_venv"
  SETUP="$SETUP; $UV pip install --python sdpo_venv/bin/python -e ./sdpo_jax 'jax[tpu]'"
  [[ -z $MOUNT ]] || SETUP="$SETUP; $MOUNT"
  run "${TPUVM[@]}" ssh "$NAME" --worker=all "${G[@]}" --command="$SETUP"
fi

# ---- 4. train: the same command on every worker, output to a log file per worker -----------
# A bucket run folder is the mounted path ~/gcs/BUCKET/PATH, an absolute one is passed as is.
quote_cmd ../sdpo_venv/bin/sdpo-train --config "$CONFIG"
TRAIN=$REPLY
if [[ -n $BUCKET ]]; then
  home_path "$WORKER_OUT"
  TRAIN="$TRAIN --config.output_dir=$REPLY"
else
  shq "--config.output_dir=$OUTPUT_DIR"
  TRAIN="$TRAIN $REPLY"
fi
if ((${#EXTRA[@]})); then
  quote_cmd "${EXTRA[@]}"
  TRAIN="$TRAIN $REPLY"
fi
REMOTE="mkdir -p sdpo_logs && cd sdpo_jax && PYTHONUNBUFFERED=1 $TRAIN"
REMOTE="$REMOTE > ../$REMOTE_LOG 2>&1 || { rc=\$?; tail -n 40 ../$REMOTE_LOG; exit \$rc; }"
quote_cmd "${TPUVM[@]}" ssh "$NAME" --worker=0 "${G[@]}" --command="tail -f $REMOTE_LOG"
note "training; follow it with: $REPLY"
train_rc=0
run --log "$LOG_DIR/launcher.log" "${TPUVM[@]}" ssh "$NAME" --worker=all "${G[@]}" \
  --command="$REMOTE" || train_rc=$?
[[ $train_rc == 0 ]] || note "sdpo-train failed on some worker (status $train_rc)"

# ---- 5. gather the logs: worker i -> LOG_DIR/worker-i.log ------------------------------------
for ((i = 0; i < NUM_WORKERS; i++)); do
  run "${TPUVM[@]}" scp "$NAME:$REMOTE_LOG" "$LOG_DIR/worker-$i.log" --worker="$i" "${G[@]}" ||
    note "could not fetch the log of worker $i"
done
note "logs: $LOG_DIR/worker-{0..$((NUM_WORKERS - 1))}.log, $LOG_DIR/launcher.log"
exit "$train_rc" # 6. --delete-after: the EXIT trap deletes the TPU
