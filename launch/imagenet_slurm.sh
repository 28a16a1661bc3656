#!/usr/bin/env bash
# ResNet-50 on ImageNet at B=8192 (Goyal et al.), on 1, 4 or 32 nodes of 8 GPUs, through SLURM and submitit.
#
#   NODES=4 SHARDS=/shared/imagenet-shards bash launch/imagenet_slurm.sh [RECIPE] [overrides...]
#
# The global batch is the recipe's, whatever the node count, so the lr schedule is the same; what changes
# is how it is split. micro-batch x GPUs x accumulation = 8192:
#   1 node   (8 GPUs):   256 x   8 x 4
#   4 nodes  (32 GPUs):  256 x  32 x 1
#   32 nodes (256 GPUs):  32 x 256 x 1   (Goyal et al.'s own split: 32 images per GPU)
# A requeued job resumes from its last checkpoint (docs/faults.md). Shards and checkpoints must be on a
# filesystem every node sees. Other settings: PARTITION, TIME (minutes per attempt), EXTRA (sbatch
# options, e.g. "--sbatch account=vision").
source "$(dirname "$0")/_common.sh"
NODES=${NODES:-1}
recipe=${1:-$repo/configs/imagenet/goyal_sgd_b8192.yaml}
shift || true
case "$NODES" in
  1|4) micro=256 ;;
  32) micro=32 ;;
  *) echo "imagenet_slurm.sh: NODES=$NODES; this recipe is laid out for 1, 4 or 32 nodes" >&2; exit 2 ;;
esac
exec "$DIST_TRAIN" launch slurm "$recipe" \
  --nodes "$NODES" --gpus-per-node 8 --cpus-per-task "${CPUS_PER_TASK:-10}" --time "${TIME:-240}" \
  ${PARTITION:+--partition "$PARTITION"} ${EXTRA:-} \
  data.shards="${SHARDS:-$repo/data/shards/imagenet}" train.micro_batch_size="$micro" \
  checkpoint.dir="${CHECKPOINTS:-$repo/runs/imagenet/$(basename "$recipe" .yaml)-${NODES}n/checkpoints}" \
  "$@" "${dry_run[@]}"
