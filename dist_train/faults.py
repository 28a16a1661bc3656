"""Preemption, time-based checkpoints and non-finite steps: decisions every rank must take together.

Signals only set a flag. The trainer reads every rank's flags with one small all-reduce per step
(``step_flags``), so all ranks stop, checkpoint, skip or requeue after the same step, and a signal
that lands on one rank is enough:

- ``SIGTERM`` and ``SIGUSR1``: checkpoint and stop (exit status 75). On SLURM, SIGTERM comes from a
  cancel, ``scontrol requeue`` or SLURM's own preemption requeue; we never requeue on it ourselves.
- ``SIGUSR2``: checkpoint, stop, and ask to be requeued. It is submitit's preemption and time-out
  signal; under submitit, rank 0 then hands it to submitit's own handler, once the checkpoint is
  written by every rank (``dist_train/launch/slurm.py``).

Decisions that depend on one rank's clock (a checkpoint every N minutes) are made by rank 0 and
travel in the same all-reduce.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL: "try again"); requeue logic keys on it."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_SIGNALS = (signal.SIGUSR2,)
PREEMPTION_SIGNALS = STOP_SIGNALS + REQUEUE_SIGNALS

_received: dict[str, str] = {}
"""Signals this process received, by kind (``stop``, ``requeue``) -> first signal's name. Process-wide, as
signals are: one that arrives before the training loop starts is not lost."""


def record_signal(signum: int) -> None:
    """Note a preemption signal (called from signal handlers: only sets a flag)."""
    kind = "requeue" if signum in REQUEUE_SIGNALS else "stop"
    _received.setdefault(kind, signal.Signals(signum).name)


def signals_received() -> dict[str, str]:
    """The preemption signals received so far, by kind (``stop``, ``requeue``) -> name."""
    return dict(_received)


def clear_signals() -> None:
    """Forget the signals received (a test, or a new run in the same process)."""
    _received.clear()


class Preempted(Exception):
    """The run was asked to stop and saved a checkpoint; run it again to continue. ``requeue``: the signal
    asked for the job to be requeued (SIGUSR2, submitit's)."""

    def __init__(self, message: str, *, requeue: bool = False):
        super().__init__(message)
        self.requeue = requeue


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm was NaN or Inf and ``train.nonfinite_loss=stop``."""


class PreemptionFlag:
    """Installs flag-setting handlers for the preemption signals while the training loop runs."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether this process received any preemption signal."""
        return bool(_received)

    @property
    def requeue(self) -> bool:
        """Whether one of them asked for a requeue (SIGUSR2)."""
        return "requeue" in _received

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)
        record_signal(signum)

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass(frozen=True)
class StepFlags:
    """What all ranks agreed on after a step."""

    nonfinite: bool
    """Some rank's loss, or the gradient norm, was NaN or Inf: skip or stop, all together."""
    stop: bool
    """Some rank was asked to stop: checkpoint and stop after this step."""
    requeue: bool
    """...and to be requeued (SIGUSR2)."""
    checkpoint: bool
    """Rank 0's clock says a time-based checkpoint is due."""
    grow: bool = False
    """The adaptive batch grows after this step (B_simple above the threshold, compared on the device)."""


def step_flags(*, loss_sum: torch.Tensor, grads_finite: torch.Tensor | None = None,
               preemption: PreemptionFlag | None = None, checkpoint_due: bool = False,
               grow: torch.Tensor | None = None, all_reduce) -> StepFlags:
    """The flags of every rank, agreed with one all-reduce (MAX) of five numbers: the step's one host sync.

    Kept on purpose (docs/performance.md, "Host syncs"): every rank must know before the optimizer step
    whether to skip it, and before the next step whether to stop, so that a preemption loses at most one
    step and a non-finite step is skipped everywhere. ``grow`` (a device bool: the adaptive batch's
    decision) rides along, so that decision costs no sync of its own."""
    device = loss_sum.device
    finite = torch.isfinite(loss_sum) if grads_finite is None else torch.isfinite(loss_sum) & grads_finite
    local = torch.tensor([float(bool(preemption and preemption.requested)),
                          float(bool(preemption and preemption.requeue)), float(checkpoint_due)])
    if device.type == "cuda":  # a pinned source: the copy is queued on the stream, the host does not wait
        local = local.pin_memory().to(device, non_blocking=True)
    # .to: before the noise scale's first update its state (and so ``grow``) may still be on the host
    wants_growth = grow.to(device) if grow is not None else torch.zeros((), dtype=torch.bool, device=device)
    flags = torch.cat([(~finite).float().reshape(1), local, wants_growth.float().reshape(1)])
    nonfinite, stop, requeue, checkpoint, grows = all_reduce(flags, torch.distributed.ReduceOp.MAX).tolist()
    return StepFlags(nonfinite=bool(nonfinite), stop=bool(stop), requeue=bool(requeue), checkpoint=bool(checkpoint),
                     grow=bool(grows))
