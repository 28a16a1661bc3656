#!/usr/bin/env bash
# A sweep as one SLURM job array, with no sbatch file: submitit writes and submits it.
#
#   bash launch/sweep_slurm.sh [CONFIG] [overrides...]
#
# The grid below is the cartesian product of the --sweep axes: 3 lrs x 3 seeds = 9 runs, each with its
# own train.run_dir and MLflow run name. Each task runs on NODES nodes of GPUS GPUs (0 makes a CPU job with
# TASKS ranks per node). Edit the axes, or pass --sweep-override-set 'k=v k=v' for an explicit list.
source "$(dirname "$0")/_common.sh"
config=${1:-$repo/configs/demo.yaml}
shift || true
if [ "${GPUS:-0}" -gt 0 ]; then resources=(--gpus-per-node "$GPUS"); else resources=(--tasks-per-node "${TASKS:-2}"); fi
exec "$DIST_TRAIN" launch slurm "$config" --nodes "${NODES:-1}" "${resources[@]}" --time "${TIME:-60}" \
  ${PARTITION:+--partition "$PARTITION"} \
  --sweep optim.lr=0.001,0.002,0.004 --sweep train.seed=0,1,2 \
  "$@" "${dry_run[@]}"
