"""Stand-ins for ``dist_train.train.run`` that launcher tests hand to ``TrainJob(entry=...)``.

They take ``(config_path, overrides)`` like the trainer. This module is not importable on the
compute side, so tests register it with ``cloudpickle.register_pickle_by_value`` and the
functions travel by value inside submitit's pickles.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _override(overrides: list[str], key: str) -> str:
    """The last value given for ``key``, as the trainer's config loader would resolve it."""
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    assert values, f"{key} not in {overrides}"
    return values[-1]


def gloo_ranks(config_path: str | None, overrides: list[str]) -> dict:
    """Form the process group from the exported env and all-reduce the ranks; what each rank saw."""
    import torch
    import torch.distributed as dist

    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                      "MASTER_PORT")}
    world_size = int(env["WORLD_SIZE"])
    rank_sum = 0
    if world_size > 1:
        dist.init_process_group("gloo", rank=int(env["RANK"]), world_size=world_size)  # env:// from export()
        total = torch.tensor([int(env["RANK"])])
        dist.all_reduce(total)
        rank_sum = int(total.item())
        dist.destroy_process_group()
    return {**env, "rank_sum": rank_sum, "config_path": config_path, "overrides": list(overrides),
            "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID")}


def hold_until_requeued(config_path: str | None, overrides: list[str]) -> dict:
    """Behave like a trainer that checkpoints into ``train.run_dir`` and resumes from it.

    The first attempt writes its "checkpoint", starts a forked helper (as DataLoader workers are)
    and, like the trainer's steps, all-reduces the ranks' preemption flags in a loop for up to two
    minutes, long enough to be preempted. When a signal has come, every rank raises ``Preempted``
    together, after which rank 0 requeues. An attempt that finds the checkpoint returns at once.
    """
    import multiprocessing

    import torch
    import torch.distributed as dist

    run_dir = Path(_override(overrides, "train.run_dir"))
    checkpoint = run_dir / "checkpoint"
    result = {"rank": int(os.environ["RANK"]), "overrides": list(overrides),
              "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))}
    if checkpoint.exists():
        return {**result, "resumed": True}
    dist.init_process_group("gloo")
    helper = multiprocessing.get_context("fork").Process(target=_helper, args=(os.getpid(),), daemon=True)
    helper.start()
    if result["rank"] == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(os.environ.get("SLURM_JOB_ID", "local"))
    from dist_train.faults import Preempted, PreemptionFlag

    deadline = time.monotonic() + 120
    with PreemptionFlag() as preemption:
        while time.monotonic() < deadline:
            flags = torch.tensor([float(preemption.requested), float(preemption.requeue)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                dist.barrier()  # as the trainer's checkpoint does: every rank is done before the requeue
                raise Preempted("the probe was signalled", requeue=bool(flags[1]))
            time.sleep(0.1)
    return {**result, "resumed": False}


def _helper(parent_pid: int) -> None:
    """A forked child that, like a DataLoader worker, dies with its rank (else SLURM waits KillWait for it)."""
    from dist_train.data.loader import _die_with_parent

    _die_with_parent(parent_pid)
    time.sleep(120)


def diverge(config_path: str | None, overrides: list[str]) -> dict:
    """A run that fails, as a trainer does when the loss turns NaN."""
    raise FloatingPointError("loss diverged at step 3")
