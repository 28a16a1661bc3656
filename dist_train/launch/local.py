"""torchrun: N ranks on this machine, or on several machines that meet at a c10d rendezvous.

``dist-train launch local`` only builds the torchrun command line and runs it; torchrun starts the
ranks, sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for them, and restarts them on failure if asked.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Sequence


def torchrun_command(config_path: str | None, overrides: Sequence[str], *, nproc_per_node: int, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "dist_train",
                     max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run ... -m dist_train.cli train CONFIG OVERRIDES``.

    One node without an endpoint is ``--standalone`` (a private rendezvous on a free port). With
    ``rdzv_endpoint`` (``host:port`` of any one node), every node runs the same command and the
    c10d rendezvous assigns node ranks.
    """
    if nproc_per_node < 1 or nnodes < 1 or max_restarts < 0:
        raise ValueError("--nproc and --nnodes must be >= 1 and --max-restarts >= 0")
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError(f"--nnodes={nnodes} needs --rdzv-endpoint HOST:PORT, the same on every node")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if rdzv_endpoint:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
    else:
        cmd.append("--standalone")
    if max_restarts:
        # A restarted rank resumes from the latest checkpoint like a requeued SLURM job does.
        cmd.append(f"--max-restarts={max_restarts}")
    return [*cmd, "-m", "dist_train.cli", "train", *([config_path] if config_path else []), *overrides]


def run_torchrun(cmd: list[str]) -> int:
    """Run ``cmd``, echoing it first; torchrun's exit code."""
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd)
