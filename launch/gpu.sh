#!/usr/bin/env bash
# launch/gpu.sh: run `sdpo-train --config ...` on GPU nodes, one process per node.
#
# JAX drives all local GPUs from one process (no torchrun-style process per GPU): on one node
# a plain `sdpo-train` sees every visible GPU; on several nodes there is one process per node
# and the processes meet through jax.distributed:
#   single node   launch/gpu.sh --config C [--gpus 0,1,2,3]
#   explicit      on every node i = 0..N-1 (same command, its own --node-rank):
#                 launch/gpu.sh --config C --coordinator HOST0:PORT --num-nodes N --node-rank i
#                 -> sdpo-train ... --coordinator HOST0:PORT --num_processes N --process_id i
#                    (sdpo-train's absl flags; absl does not accept --num-processes)
#   SLURM         inside an allocation (salloc, or sbatch launch/slurm_gpu.sbatch), once:
#                 launch/gpu.sh --slurm --config C [--num-nodes N]
#                 -> srun --ntasks-per-node=1 ... sdpo-train ... (sdpo-train detects SLURM)
# The installed package is assumed on every node (pip install -e . "jax[cuda12]").
#
# Every command goes through run(): with --dry-run it is printed (one per line, shell-quoted,
# copy-pasteable; '#' lines are comments) instead of executed. Usage errors: one line on
# stderr, exit status 2. Logs: LOG_DIR/node-<rank>.log (default logs/<name>).
set -euo pipefail
exec 3>&1 # run() prints dry-run lines here (launch/lib.sh)

PROG=gpu.sh

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --config PATH [options] [-- SDPO_TRAIN_ARGS...]

  --config PATH            sdpo-train config                                 SDPO_CONFIG
  --output-dir DIR         --config.output_dir (keep it on shared storage    SDPO_OUTPUT_DIR
                           for several nodes; a rerun resumes from it)
  --extra "ARGS"           extra sdpo-train args, whitespace-split           SDPO_EXTRA
                           (args after `--` are passed verbatim, spaces kept)
  --gpus LIST              CUDA_VISIBLE_DEVICES for the process, e.g. 0,1,2,3 GPU_DEVICES
  --mem-fraction F         XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90)     XLA_PYTHON_CLIENT_MEM_FRACTION
  --name NAME              run name for the log folder (default sdpo)        RUN_NAME
  --log-dir DIR            log folder (default logs/NAME)                    LOG_DIR
 explicit multi-node (run on every node):
  --coordinator HOST:PORT  address of node 0's coordinator service           GPU_COORDINATOR
  --num-nodes N            number of nodes (processes)                       GPU_NUM_NODES
  --node-rank I            this node's index, 0..N-1                         GPU_NODE_RANK
 SLURM (run once, inside an allocation):
  --slurm                  launch with srun, one task per node               GPU_SLURM=1
  --num-nodes N            srun --nodes=N (default: the whole allocation)
  --srun-args "ARGS"       extra srun flags, e.g. "--gpus-per-task=8"        SRUN_ARGS
  --dry-run                print every command instead of running it         DRY_RUN=1
  -h, --help               this text
Environment: SDPO_TRAIN overrides the trainer command (default sdpo-train). NCCL settings
(NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, ...) are cluster specific and left to you:
exported variables reach the trainer, also through srun.
EOF
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONFIG=${SDPO_CONFIG:-}
OUTPUT_DIR=${SDPO_OUTPUT_DIR:-}
EXTRA_STR=${SDPO_EXTRA:-}
GPUS=${GPU_DEVICES:-}
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
NAME=${RUN_NAME:-sdpo}
LOG_DIR=${LOG_DIR:-}
COORDINATOR=${GPU_COORDINATOR:-}
NUM_NODES=${GPU_NUM_NODES:-}
NODE_RANK=${GPU_NODE_RANK:-}
SLURM=${GPU_SLURM:-0}
SRUN_STR=${SRUN_ARGS:-}
DRY_RUN=${DRY_RUN:-0}
PASSTHROUGH=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --output-dir) need_value "$@"; OUTPUT_DIR=$2; shift 2 ;;
    --extra) need_value "$@"; EXTRA_STR="$EXTRA_STR $2"; shift 2 ;;
    --gpus) need_value "$@"; GPUS=$2; shift 2 ;;
    --mem-fraction) need_value "$@"; MEM_FRACTION=$2; shift 2 ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
    --coordinator) need_value "$@"; COORDINATOR=$2; shift 2 ;;
    --num-nodes) need_value "$@"; NUM_NODES=$2; shift 2 ;;
    --node-rank) need_value "$@"; NODE_RANK=$2; shift 2 ;;
    --srun-args) need_value "$@"; SRUN_STR="$SRUN_STR $2"; shift 2 ;;
    --config=* | --output-dir=* | --extra=* | --gpus=* | --mem-fraction=* | --name=* | \
      --log-dir=* | --coordinator=* | --num-nodes=* | --node-rank=* | --srun-args=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      ;;
    --slurm) SLURM=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; PASSTHROUGH=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n $CONFIG ]] || die "missing --config (or SDPO_CONFIG)"
[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
[[ $SLURM == 0 || $SLURM == 1 ]] || die "GPU_SLURM must be 0 or 1, got '$SLURM'"
frac_re='^(0?\.[0-9]+|1(\.0*)?)$'
[[ $MEM_FRACTION =~ $frac_re ]] || die "--mem-fraction must be in (0, 1], got '$MEM_FRACTION'"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must look like 0,1,2,3, got '$GPUS'"
[[ -z $NUM_NODES || $NUM_NODES =~ ^[1-9][0-9]*$ ]] || die "--num-nodes must be a positive integer, got '$NUM_NODES'"
if [[ $SLURM == 1 ]]; then
  MODE=slurm
  [[ -z $COORDINATOR && -z $NODE_RANK ]] ||
    die "--slurm takes no --coordinator/--node-rank (srun and sdpo-train's SLURM detection set them)"
  [[ -n ${SLURM_JOB_ID:-} || $DRY_RUN == 1 ]] ||
    die "--slurm runs inside an allocation (sbatch launch/slurm_gpu.sbatch, or salloc)"
elif [[ -n $COORDINATOR || -n $NODE_RANK ]]; then
  MODE=explicit
  [[ -n $COORDINATOR ]] || die "missing --coordinator HOST:PORT (or GPU_COORDINATOR) with --node-rank"
  addr_re='^[^:[:space:]]+:[0-9]+$'
  [[ $COORDINATOR =~ $addr_re ]] || die "--coordinator must be HOST:PORT, got '$COORDINATOR'"
  [[ -n $NUM_NODES ]] || die "missing --num-nodes (or GPU_NUM_NODES) with --coordinator"
  [[ -n $NODE_RANK ]] || die "missing --node-rank (or GPU_NODE_RANK) with --coordinator"
  [[ $NODE_RANK =~ ^[0-9]+$ ]] || die "--node-rank must be an integer, got '$NODE_RANK'"
  ((NODE_RANK < NUM_NODES)) || die "--node-rank $NODE_RANK is not in 0..$((NUM_NODES - 1))"
else
  MODE=single
  [[ -z $NUM_NODES || $NUM_NODES == 1 ]] ||
    die "--num-nodes $NUM_NODES needs --coordinator HOST:PORT --node-rank I, or --slurm"
fi
EXTRA=()
SRUN_EXTRA=()
read -r -a EXTRA <<<"$EXTRA_STR" || true
read -r -a SRUN_EXTRA <<<"$SRUN_STR" || true
EXTRA+=(${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
TRAINER=()
read -r -a TRAINER <<<"${SDPO_TRAIN:-sdpo-train}" || true
LOG_DIR=${LOG_DIR:-logs/$NAME}
if [[ $MODE == slurm && $LOG_DIR != /* ]]; then LOG_DIR=$PWD/$LOG_DIR; fi # srun opens it on each node

# The process environment: XLA may take this fraction of each GPU's memory up front (JAX's
# default is 0.75); CUDA_VISIBLE_DEVICES only when --gpus narrows the visible GPUs.
ENV=(env XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
if [[ -n $GPUS ]]; then ENV+=(CUDA_VISIBLE_DEVICES="$GPUS"); fi
TRAIN=("${TRAINER[@]}" --config "$CONFIG")
if [[ -n $OUTPUT_DIR ]]; then TRAIN+=(--config.output_dir="$OUTPUT_DIR"); fi
TRAIN+=(${EXTRA[@]+"${EXTRA[@]}"})

run mkdir -p "$LOG_DIR"
case $MODE in
  single)
    note "one node, one process driving all its visible GPUs${GPUS:+ ($GPUS)}"
    run --log "$LOG_DIR/node-0.log" "${ENV[@]}" "${TRAIN[@]}"
    ;;
  explicit)
    note "node $NODE_RANK of $NUM_NODES; coordinator $COORDINATOR (node 0 listens there);" \
      "run the same command on every node with its own --node-rank"
    run --log "$LOG_DIR/node-$NODE_RANK.log" "${ENV[@]}" "${TRAIN[@]}" \
      --coordinator "$COORDINATOR" --num_processes "$NUM_NODES" --process_id "$NODE_RANK"
    ;;
  slurm)
    note "srun: one task per node${NUM_NODES:+ on $NUM_NODES nodes}; sdpo-train finds its peers from SLURM's variables"
    SRUN=(srun --ntasks-per-node=1)
    if [[ -n $NUM_NODES ]]; then SRUN+=(--nodes="$NUM_NODES"); fi
    SRUN+=(--kill-on-bad-exit=1 --open-mode=append --output="$LOG_DIR/node-%t.log")
    run "${SRUN[@]}" ${SRUN_EXTRA[@]+"${SRUN_EXTRA[@]}"} "${ENV[@]}" "${TRAIN[@]}"
    ;;
esac
