#!/usr/bin/env bash
# igscale on Slurm: N nodes x G processes per node, for `igscale train | sample | eval`.
#
#   sbatch [sbatch options] launch/submit.sh <train|sample|eval> [igscale args...]
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 launch/submit.sh train --config configs/sit_xl2_ig.yaml
#
# One torchrun per node (srun --ntasks-per-node=1), c10d rendezvous on the first node of the allocation.
# Command-line sbatch options override the #SBATCH defaults below. Preemption: Slurm sends USR1 to this script
# IGSCALE_SIGNAL_LEAD seconds (here 300) before the time limit, or an admin does `scancel --batch --signal=USR1 J`;
# the script forwards it to every rank, the trainer checkpoints after its current step and exits, and the job
# requeues itself (`scontrol requeue`); the rerun resumes from the checkpoint named by `latest`.
# S3 endpoint and credentials are passed through from the submitting environment (sbatch --export=ALL) and
# never printed. See docs/launch.md for every variable.
#SBATCH --job-name=igscale
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=igscale-%x-%j.out
set -euo pipefail

die() { echo "submit.sh: error: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job; submit with: sbatch launch/submit.sh <train|sample|eval> [args]"
MODE="${1:-}"
case "$MODE" in
  train | sample | eval) shift ;;
  *) die "first argument must be train, sample or eval (got '${MODE}')" ;;
esac

# --- environment ------------------------------------------------------------------------------------------------
ROOT="${IGSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"          # repo (or any dir) the job runs in
PYTHON="${IGSCALE_PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3 || true)"
[[ -n "$PYTHON" && -x "$PYTHON" ]] || die "no python: set IGSCALE_PYTHON (default \$IGSCALE_ROOT/.venv/bin/python)"
"$PYTHON" -c "import igscale" 2>/dev/null || die "$PYTHON cannot import igscale: set IGSCALE_PYTHON to the venv that has it"

# S3: an endpoint (or s3:// URLs in the arguments) needs both credentials; check presence, never print values.
if [[ -n "${AWS_ENDPOINT_URL:-}" || " $* " == *"s3://"* ]]; then
  for v in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
    [[ -n "${!v:-}" ]] || die "$v is not set but the job uses S3 (export it before sbatch; it is passed through, not logged)"
  done
fi

NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
NPROC="${IGSCALE_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
[[ "$NPROC" =~ ^[0-9]+$ && "$NPROC" -ge 1 ]] || die "IGSCALE_NPROC_PER_NODE must be a positive integer (got '$NPROC')"
CPUS_PER_NODE="${SLURM_CPUS_ON_NODE:-1}"
PORT="${IGSCALE_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
SHUTDOWN_TIMEOUT="${IGSCALE_SHUTDOWN_TIMEOUT:-600}"   # seconds ranks get to write the preemption checkpoint

# Rendezvous on the first node. Use each node's NodeAddr rather than its name: node names need not resolve.
declare -A ADDR=()
while read -r name addr; do ADDR[$name]="$addr"; done < <(
  scontrol -o show node "$SLURM_JOB_NODELIST" | sed -n 's/^NodeName=\([^ ]*\).* NodeAddr=\([^ ]*\).*/\1 \2/p')
HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
HEAD_ADDR="${ADDR[$HEAD]:-$HEAD}"
NODE_ADDRS=""
for n in "${!ADDR[@]}"; do NODE_ADDRS+="$n=${ADDR[$n]} "; done
export IGSCALE_NODE_ADDRS="$NODE_ADDRS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CPUS_PER_NODE / NPROC > 0 ? CPUS_PER_NODE / NPROC : 1 ))}"

echo "submit.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: igscale $MODE on $NNODES node(s) x $NPROC," \
     "rendezvous $HEAD_ADDR:$PORT, python $PYTHON, S3 endpoint ${AWS_ENDPOINT_URL:-unset}" \
     "(credentials passed through, not shown)"

# --- launch: one torchrun per node ------------------------------------------------------------------------------
# torchrun forwards USR1 to its workers (--signals-to-handle) and waits SHUTDOWN_TIMEOUT for their checkpoint.
NODE_CMD='me="$SLURMD_NODENAME"; local_addr="$me"
for kv in $IGSCALE_NODE_ADDRS; do [[ "${kv%%=*}" == "$me" ]] && local_addr="${kv#*=}"; done
exec "$0" -m torch.distributed.run --nnodes="$IGSCALE_NNODES" --nproc-per-node="$IGSCALE_NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$IGSCALE_RDZV" --rdzv-id="$IGSCALE_RDZV_ID" --max-restarts=0 \
  --local-addr="$local_addr" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout="$IGSCALE_SHUTDOWN_TIMEOUT" -m igscale.cli.main "$@"'
export IGSCALE_NNODES="$NNODES" IGSCALE_NPROC="$NPROC" IGSCALE_RDZV="$HEAD_ADDR:$PORT" \
       IGSCALE_RDZV_ID="$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}" IGSCALE_SHUTDOWN_TIMEOUT="$SHUTDOWN_TIMEOUT"

PREEMPTED=0
on_usr1() {
  if [[ "$PREEMPTED" == 0 ]]; then
    PREEMPTED=1
    echo "submit.sh: USR1 received: asking every rank to checkpoint, then requeueing job $SLURM_JOB_ID"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true   # srun forwards the signal to every task (torchrun)
  fi
}
trap on_usr1 USR1

cd "$ROOT"
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE" \
  --kill-on-bad-exit=1 bash -c "$NODE_CMD" "$PYTHON" "$MODE" "$@" &
SRUN_PID=$!
# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting until srun itself is done.
RC=0
while :; do
  wait "$SRUN_PID" && RC=0 || RC=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [[ "$RC" == 0 ]]; then
  echo "submit.sh: igscale $MODE finished"
  exit 0
fi
if [[ "$PREEMPTED" == 1 ]]; then
  echo "submit.sh: ranks exited ($RC) after the preemption checkpoint; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "submit.sh: igscale $MODE failed with exit code $RC" >&2
exit "$RC"
