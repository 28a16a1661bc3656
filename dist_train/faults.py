"""Preemption and non-finite losses: decisions every rank must take together.

``SIGTERM`` and ``SIGUSR1`` only set a flag; the trainer reads the flags of all ranks with one
small all-reduce per step (together with "was this step's loss finite?"), so all ranks stop,
checkpoint, or skip the same step. A signal that lands on one rank is enough.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL: "try again"); requeue logic keys on it."""
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run was asked to stop, saved a checkpoint, and should be restarted to continue."""


class NonFiniteLoss(RuntimeError):
    """The loss was NaN or Inf and ``train.nonfinite_loss=stop``."""


class PreemptionFlag:
    """Installs flag-setting handlers for the preemption signals while the training loop runs."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)
        self.requested = True

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def step_flags(*, loss_sum: torch.Tensor, preempt_requested: bool, all_reduce) -> tuple[bool, bool]:
    """(any rank's loss not finite, any rank asked to stop), agreed by all ranks with one all-reduce."""
    flags = torch.stack([(~torch.isfinite(loss_sum)).float(),
                         torch.tensor(float(preempt_requested), device=loss_sum.device)])
    flags = all_reduce(flags, torch.distributed.ReduceOp.MAX)
    nonfinite, preempt = flags.tolist()
    return bool(nonfinite), bool(preempt)
