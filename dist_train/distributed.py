"""The one place that reads launcher environment variables and starts the process group.

torchrun and submitit's ``TorchDistributedEnvironment().export()`` set RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A bare ``srun`` sets only
SLURM_* variables; those are translated here. With neither, the run is a single process.
"""

from __future__ import annotations

import datetime
import os
import random
import subprocess
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name].split("(")[0].split(",")[0])
    return default


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def read_launch_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun/submitit or SLURM variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = _env_int("RANK", default=0), _env_int("WORLD_SIZE", default=1)
        local_rank = _env_int("LOCAL_RANK", default=0)
        return rank, world, local_rank, _env_int("LOCAL_WORLD_SIZE", default=world)
    if "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:
        rank, world = _env_int("SLURM_PROCID", default=0), _env_int("SLURM_NTASKS", default=1)
        local_rank = _env_int("SLURM_LOCALID", default=0)
        local_world = _env_int("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", default=world)
        if "MASTER_ADDR" not in os.environ:  # not setdefault: that would run scontrol on every call
            os.environ["MASTER_ADDR"] = _slurm_master_addr()
        os.environ.setdefault("MASTER_PORT", str(20000 + _env_int("SLURM_JOB_ID", default=0) % 20000))
        return rank, world, local_rank, local_world
    return 0, 1, 0, 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(*, device: str = "auto", threads_per_rank: int = 0, timeout_s: int = 1800) -> DistInfo:
    """Start the process group if launched with several processes; pick the device and thread count."""
    rank, world, local_rank, local_world = read_launch_env()
    dev = pick_device(device, local_rank)
    if dev.type == "cpu":
        # Ranks on one machine share its cores; oversubscribing them slows every rank down.
        torch.set_num_threads(threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timeout, store=_attempt_store(rank, world, timeout))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, device=dev)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, a store whose keys belong to this restart attempt alone; None elsewhere (env://).

    torchrun's agent keeps one store across ``--max-restarts`` attempts. Seen here: a restarted gloo
    group read the dead attempt's peer addresses from it and failed with "connection refused".
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts_store and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"dist_train/attempt_{attempt}", store)


def barrier(info: DistInfo) -> None:
    """Wait for every rank; nothing to wait for in one process."""
    if info.is_distributed:
        dist.barrier()


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value: a decision rank 0 made for all)."""
    if not info.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def broadcast_tensors(info: DistInfo, tensors: list[torch.Tensor]) -> None:
    """Rank 0's values copied into ``tensors`` on every rank, in place (a collective; nothing in one process).

    One broadcast per dtype of the tensors laid end to end, so that many small ones (a ResNet-50's 53
    BatchNorm layers hold 159 buffers, 0.2 MB) cost one or two collectives, not one each."""
    if not info.is_distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor.detach())
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        parts = flat.split([t.numel() for t in group])
        torch._foreach_copy_(group, [part.view_as(t) for t, part in zip(group, parts)])


# Every seed a run derives from train.seed, in one place. The formulas are kept as they were when the
# study ran, so its runs reproduce.
def data_seed(seed: int) -> int:
    """The seed of the training data order, apart from the model's (an odd multiplier keeps them apart)."""
    return seed * 7919 + 1


def mixing_seed(seed: int) -> int:
    """The seed of MixUp's and CutMix's draws (``dist_train/mixing.py``), apart from the data order's and the model's."""
    return seed * 7919 + 2


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). Ranks pass the same seed so models start identical."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
