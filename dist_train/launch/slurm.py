"""SLURM through submitit: one task per GPU (or ``tasks_per_node`` CPU tasks), sweeps as job arrays.

Each task runs ``TrainJob``: it exports the variables ``torch.distributed`` reads (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) and calls ``dist_train.train.run``. On preemption or
time-out SLURM sends SIGUSR2 ahead of the kill. The trainer finishes its step and every rank writes
the checkpoint; then submitit's handler in rank 0 calls ``TrainJob.checkpoint()`` and requeues the
job with what it returns: the same config and overrides, plus ``checkpoint.resume=true``. The
requeued job continues from that checkpoint, and the trainer continues the MLflow run whose id it
stored in the run dir. At most the step in flight is redone. The order of these events, and how a
requeue is kept from looking like a failure, is in ``preemption.py``.

submitit is imported inside the functions that need it, so ``import dist_train`` stays light.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TextIO

from dist_train.config import check, load_config
from dist_train.launch.preemption import PreemptionGuard
from dist_train.launch.sweep import SweepMember, keys_of, separate_outputs

Entry = Callable[[str | None, list[str]], Any]
RESUME_OVERRIDE = "checkpoint.resume=true"


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ImportError("dist-train launch slurm needs submitit: pip install 'dist_train[slurm]'") from None
    return submitit


@dataclass(frozen=True)
class TrainJob:
    """What every task of a job runs; pickled by submitit and unpickled on the compute node."""

    config_path: str | None
    """YAML config, resolved to an absolute path at submission (a job may run in another directory)."""
    overrides: tuple[str, ...] = ()
    """Dotted overrides, exactly as the trainer takes them."""
    entry: Entry | None = None
    """Called as ``entry(config_path, overrides)`` on every task; None means ``dist_train.train.run``."""

    def __call__(self) -> Any:
        submitit = _submitit()
        # Not CUDA_VISIBLE_DEVICES: SLURM already limits a job to its GPUs, and the trainer picks
        # cuda:LOCAL_RANK among them, as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        guard = PreemptionGuard.install(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))
        from dist_train.faults import Preempted
        from dist_train.train import run

        entry = self.entry or run
        try:
            return entry(self.config_path, list(self.overrides))
        except Preempted as err:  # every rank has written the checkpoint
            if err.requeue:
                guard.requeue()  # rank 0: submitit checkpoint() and scontrol requeue
            guard.leave_without_result(err)
            raise  # unreachable: leave_without_result exits
        except Exception as err:
            # submitit's own "not requeued" errors are real outcomes; anything else after the signal
            # is the ranks coming apart during the requeue.
            if guard.signalled and not isinstance(err, submitit.core.utils.UncompletedJobError):
                guard.leave_without_result(err)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on SIGUSR2 (preemption, time-out): resubmit this job, resuming."""
        return _submitit().helpers.DelayedSubmission(self.resumed())

    def resumed(self) -> "TrainJob":
        """The same job, made to resume even if its overrides said ``checkpoint.resume=false``."""
        if self.overrides and self.overrides[-1] == RESUME_OVERRIDE:
            return self
        return dataclasses.replace(self, overrides=(*self.overrides, RESUME_OVERRIDE))


@dataclass(frozen=True)
class SlurmResources:
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node; one task per GPU. 0 makes a CPU job with ``tasks_per_node`` tasks."""
    tasks_per_node: int | None = None
    """CPU jobs: tasks (ranks) per node, default 1. GPU jobs: must be unset or equal ``gpus_per_node``."""
    cpus_per_task: int | None = None
    """CPU cores per task; None takes the cluster's default."""
    mem_gb: float | None = None
    """Memory per node in GB; None takes the cluster's default."""
    partition: str | None = None
    """SLURM partition; None takes the cluster's default partition."""
    time_min: int = 60
    """Wall-clock limit per attempt, in minutes. A job that hits it is requeued and resumes."""
    max_requeues_on_timeout: int = 3
    """How many times a job that runs out of time is requeued (preemptions do not count)."""
    job_name: str = "dist_train"
    """SLURM job name."""
    sbatch: dict[str, Any] = field(default_factory=dict)
    """Extra ``#SBATCH --key=value`` options (``True`` for a bare flag), e.g. ``{"account": "vision"}``."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.time_min < 1:
            raise ValueError("--nodes and --time must be >= 1 and --gpus-per-node >= 0")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"--tasks-per-node={self.tasks_per_node} with --gpus-per-node={self.gpus_per_node}: "
                             "GPU jobs run one task per GPU; drop --tasks-per-node")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError("--tasks-per-node must be >= 1")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def plan_jobs(config_path: str | None, overrides: Sequence[str], *, members: Sequence[SweepMember] = (),
              world_size: int, entry: Entry | None = None) -> list[TrainJob]:
    """One ``TrainJob`` per sweep member (or one for no sweep), each config validated before submission.

    Validating here (``dist_train.config.check``) turns a typo, a rule across sections or a global batch
    that does not divide over the ranks into an error now, not after the job has waited in the queue.
    """
    config = str(Path(config_path).resolve()) if config_path else None
    jobs = []
    candidates: list[SweepMember | None] = [*members] or [None]
    for member in candidates:
        own = (*overrides, *member.overrides) if member else tuple(overrides)
        if member:
            separate = separate_outputs(load_config(config, own), member, given_keys=keys_of(member.overrides))
            own = (*own, *separate)
        cfg = load_config(config, own)
        check(cfg, world_size=world_size)
        jobs.append(TrainJob(config, own, entry))
    return jobs


def make_executor(kind: Literal["auto", "slurm", "local"], folder: str | Path, resources: SlurmResources) -> Any:
    """A submitit executor for ``resources``; ``local`` runs the tasks as processes on this machine."""
    submitit = _submitit()
    if kind == "local" and resources.nodes != 1:
        raise ValueError("--executor local runs on this machine only; use --nodes 1")
    private_folder(folder)
    executor = submitit.AutoExecutor(folder=folder, cluster=None if kind == "auto" else kind,
                                     slurm_max_num_timeout=resources.max_requeues_on_timeout)
    params: dict[str, Any] = dict(name=resources.job_name, timeout_min=resources.time_min, nodes=resources.nodes,
                                  tasks_per_node=resources.ranks_per_node, cpus_per_task=resources.cpus_per_task,
                                  mem_gb=resources.mem_gb, slurm_partition=resources.partition,
                                  slurm_additional_parameters=dict(resources.sbatch) or None)
    if resources.gpus_per_node:  # an explicit --gpus-per-node=0 is refused by clusters without GRES
        params["gpus_per_node"] = resources.gpus_per_node
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def private_folder(folder: str | Path) -> Path:
    """Create the fixed part of the submitit ``folder`` (up to the first ``%`` pattern) with mode 0700, or check an
    existing one. Every task unpickles the job it finds there: anyone who can write to it can run code as the
    job's user, so a folder that group or others can write to is refused."""
    parts = Path(folder).parts
    fixed = Path(*parts[:next((i for i, part in enumerate(parts) if "%" in part), len(parts))] or ["."])
    fixed.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = fixed.stat().st_mode
    if mode & 0o022:
        raise PermissionError(f"the submitit folder {fixed} can be written by group or others (mode {mode & 0o777:o}); "
                              f"every task unpickles the job file it finds there, so anyone who can write to it could "
                              f"run code as you. Run `chmod go-w {fixed}`, or pass --folder with a private directory")
    return fixed


def submit(executor: Any, jobs: Sequence[TrainJob]) -> list[Any]:
    """Submit one job, or several as one job array."""
    if len(jobs) == 1:
        return [executor.submit(jobs[0])]
    with executor.batch():
        handles = [executor.submit(job) for job in jobs]
    return handles


def describe(handles: Sequence[Any], jobs: Sequence[TrainJob], *, out: TextIO = sys.stdout) -> None:
    for handle, job in zip(handles, jobs):
        extra = " ".join(job.overrides)
        print(f"submitted job {handle.job_id}  ({extra or 'no overrides'})", file=out)
        print(f"  rank 0 log: {handle.paths.stdout}\n  rank 0 err: {handle.paths.stderr}", file=out)


def follow(handles: Sequence[Any], *, poll_s: float = 5.0, out: TextIO = sys.stdout) -> int:
    """Wait for every job, echoing state changes (and rank 0's log for a single job); 1 if any failed."""
    # Rank 0's stdout and stderr (where logging goes) for a single job; states only for arrays.
    single = len(handles) == 1
    tails = [_LogTail(handles[0].paths.stdout, out), _LogTail(handles[0].paths.stderr, out)] if single else []
    states: dict[str, str] = {}
    pending = list(handles)
    while pending:
        for handle in list(pending):
            state = handle.state
            if states.get(handle.job_id) != state and state != "UNKNOWN":  # UNKNOWN: not in sacct yet
                states[handle.job_id] = state
                print(f"job {handle.job_id}: {state}", file=out, flush=True)
            if handle.done():
                pending.remove(handle)
        for tail in tails:
            tail.poll()
        if pending:
            time.sleep(poll_s)
    for tail in tails:
        tail.poll()
    return _report(handles, out)


def _report(handles: Sequence[Any], out: TextIO) -> int:
    failed = 0
    for handle in handles:
        try:
            handle.results()
            print(f"job {handle.job_id}: done", file=out)
        except Exception as err:  # the job's own exception, re-raised here by submitit
            failed += 1  # submitit's message carries the task's traceback and its log paths
            print(f"job {handle.job_id}: FAILED\n{textwrap.indent(str(err).strip(), '  ')}", file=out)
    return 1 if failed else 0


class _LogTail:
    """Echo what is appended to a log file (SLURM appends across requeues)."""

    def __init__(self, path: Path, out: TextIO):
        self.path, self.out, self.offset = Path(path), out, 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        self.offset += len(chunk)
        if chunk:
            self.out.write(chunk.decode(errors="replace"))
            self.out.flush()

