"""Keep a requeue from looking like a failure, inside a submitit task.

SLURM signals *every* process of a job step: on preemption or near the time limit SIGUSR2, and
SIGTERM when the requeue (or a cancel) takes the step down. Two things then go wrong with plain
submitit and a trainer that uses DataLoader workers and collectives:

- Forked DataLoader workers inherit submitit's SIGUSR2 handler and rank 0's SLURM_PROCID, so
  each of them also "checkpoints" and runs ``scontrol requeue``, racing rank 0.
- Once rank 0 has requeued and left, the other ranks' next collective fails (and rank 0's
  DataLoader sees its workers die). submitit stores that exception as the task's result. A
  client waiting on the job then reports it as failed, although SLURM requeued it.

``PreemptionGuard`` fixes both. Forked children ignore SIGUSR2, so only the rank processes act on
it. A task that raises after it has been signalled leaves without a result, and the next attempt's
result is the one that counts.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import Any

log = logging.getLogger(__name__)
_shielded_forks: set[int] = set()


class PreemptionGuard:
    """Notes SIGUSR2/SIGTERM in this task, then hands them to the handler submitit installed."""

    def __init__(self, preempt_signal: int):
        self.preempt_signal = preempt_signal
        self.signalled: str | None = None
        """Name of the first such signal received, or None."""

    @classmethod
    def install(cls, preempt_signal: int) -> "PreemptionGuard":
        guard = cls(preempt_signal)
        for sig in (preempt_signal, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if callable(previous):  # only chain to submitit's handlers, never replace a default action
                signal.signal(sig, functools.partial(guard._note, previous=previous))
        if preempt_signal not in _shielded_forks:  # register_at_fork cannot be undone: once per process
            _shielded_forks.add(preempt_signal)
            os.register_at_fork(after_in_child=lambda: signal.signal(preempt_signal, signal.SIG_IGN))
        return guard

    def _note(self, signum: int, frame: Any, *, previous: Any) -> None:
        self.signalled = self.signalled or signal.Signals(signum).name
        previous(signum, frame)

    def leave_without_result(self, err: BaseException) -> None:
        """Exit now, so that submitit writes no result for this attempt. Never returns."""
        log.warning("%s: %s after %s; the job is being requeued or cancelled, so this attempt leaves "
                    "without a result", type(err).__name__, err, self.signalled)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
