#!/usr/bin/env bash
# The same training on several machines without SLURM: run this on every node, with the same HOST0.
#
#   HOST0=10.1.0.1 NNODES=2 NPROC=8 bash launch/torchrun_multinode.sh CONFIG [overrides...]
#
# torchrun's c10d rendezvous on HOST0:PORT (default 29400) assigns the node ranks, so no node needs to
# know its own. NPROC is ranks per node, one per GPU (on CPUs: 1 or 2, over gloo). Checkpoints and shards
# must be on a filesystem every node sees, or give each node the same checkpoint.dir on shared storage.
# MAX_RESTARTS restarts failed ranks, which resume from the last checkpoint.
source "$(dirname "$0")/_common.sh"
: "${HOST0:?set HOST0 to the address of the node that hosts the rendezvous}"
config=${1:?give a config, e.g. configs/imagenet/goyal_sgd_b8192.yaml}
shift
exec "$DIST_TRAIN" launch local "$config" --nnodes "${NNODES:-2}" --nproc "${NPROC:-8}" \
  --rdzv-endpoint "$HOST0:${PORT:-29400}" --rdzv-id "${RDZV_ID:-dist_train}" --max-restarts "${MAX_RESTARTS:-0}" \
  "$@" "${dry_run[@]}"
