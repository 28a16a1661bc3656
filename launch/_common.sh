# Sourced by the launch recipes: where dist-train is, and the dry-run switch.
#   DIST_TRAIN   the dist-train command (default: the checkout's .venv/bin/dist-train, else the one on PATH)
#   DRY_RUN=1    check the config against the world size and print what would run, then stop
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
if [ -z "${DIST_TRAIN:-}" ]; then
  if [ -x "$repo/.venv/bin/dist-train" ]; then DIST_TRAIN="$repo/.venv/bin/dist-train"; else DIST_TRAIN=dist-train; fi
fi
dry_run=()
if [ -n "${DRY_RUN:-}" ]; then dry_run=(--dry-run); fi
