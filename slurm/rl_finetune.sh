#!/usr/bin/env bash
# Run lastmile stages on Slurm, one process per GPU (or per CPU task) on every node.
#
#   sbatch slurm/rl_finetune.sh trainer/configs/tiny.yaml output_dir=runs/tiny
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/rl_finetune.sh my.yaml output_dir=/shared/run1
#   LASTMILE_STAGES="sft" sbatch slurm/rl_finetune.sh my.yaml ...        # a single stage
#
# Arguments: a config path, then dotted overrides. Stages: $LASTMILE_STAGES (default "pipeline": SFT, reward model, PPO and the report).
# No hyperparameters here: they live in the config. Preemption: on SIGUSR1 (sent --signal seconds
# before the time limit, or by `scancel --signal=USR1 --batch`) or SIGTERM (preemption, `scontrol
# requeue`), the trainer finishes its step, checkpoints, exits 75, and this script requeues the job;
# the requeued job resumes from the checkpoint in the same MLflow run. Finished stages are skipped.
#SBATCH --job-name=lastmile
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

CONFIG=${1:?usage: sbatch slurm/rl_finetune.sh CONFIG [key=value ...]}
shift
STAGES=${LASTMILE_STAGES:-pipeline}
cd "${SLURM_SUBMIT_DIR:-.}"
VENV=${LASTMILE_VENV:-.venv}
[ -f "$VENV/bin/activate" ] && . "$VENV/bin/activate"

# Rendezvous from Slurm: the first node hosts rank 0, at the address Slurm itself reaches it by
# (NodeAddr; the node name where none is set); the port is derived from the job id.
FIRST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$FIRST" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
MASTER_ADDR=${MASTER_ADDR:-$FIRST}
export MASTER_ADDR MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1
echo "[lastmile] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NTASKS ranks, master $MASTER_ADDR:$MASTER_PORT, stages: $STAGES"

child=""
forward() { [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null; }  # srun passes USR1 on to every rank
trap forward USR1 TERM

for stage in $STAGES; do
  # srun starts one task per rank; lastmile.distributed maps SLURM_PROCID/SLURM_NTASKS to RANK/WORLD_SIZE.
  # --wait: once one rank ends, the others get 120 s to finish (all exit 75 together after a stop
  # signal) before srun kills them, so a crashed rank cannot leave the rest hanging in a collective.
  srun --wait=120 python -m lastmile "$stage" --config "$CONFIG" "$@" &
  child=$!
  while :; do wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null || break; done  # a trap interrupts wait
  child=""
  if [ "$rc" -eq 75 ]; then
    echo "[lastmile] $stage checkpointed after a stop signal; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || true
    exit 0
  elif [ "$rc" -ne 0 ]; then
    echo "[lastmile] $stage failed with exit code $rc"
    exit "$rc"
  fi
done
echo "[lastmile] all stages done: $STAGES"
