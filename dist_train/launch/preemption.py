"""Preemption inside a submitit task: checkpoint first, requeue after, and never look like a failure.

SLURM signals *every* process of a job step: SIGUSR2 on preemption (with
``PreemptParameters=send_user_signal``) or ``--signal`` seconds before the time limit, and SIGTERM when a
requeue or a cancel takes the step down. submitit's own USR2 handler, in rank 0, calls
``checkpoint()``, runs ``scontrol requeue`` and exits at once, in the middle of a step: the other ranks hang
at their next collective, and everything since the last periodic checkpoint is lost.

``PreemptionGuard`` changes the order. On USR2 it only sets the trainer's flag
(``dist_train.faults.record_signal``). All ranks agree through the per-step flag all-reduce, finish the step,
write the checkpoint collectively and pass its barrier; the trainer then raises ``Preempted(requeue=True)``,
and only then does rank 0 call the submitit handler it saved, once, which also keeps submitit's time-out
accounting. At most the step in flight when the signal came is lost, and it is not lost: it is saved.
SIGTERM is noted the same way and checkpoints without a requeue (SLURM requeues by itself when it sent it).

Two more things it fixes:

- Forked DataLoader workers inherit the handlers and rank 0's SLURM_PROCID; they ignore USR2, so they
  cannot requeue the job behind rank 0's back.
- A task that raises after it was signalled (its peers gone) leaves without a result, so a client waiting on
  the job does not report the requeue as a failure; the next attempt's result is the one that counts.
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
    """Notes SIGUSR2/SIGTERM for the trainer; hands USR2 to submitit's handler only after the checkpoint."""

    def __init__(self, preempt_signal: int):
        self.preempt_signal = preempt_signal
        self._submitit_handler: Any = None

    @property
    def signalled(self) -> str | None:
        """Name of the first preemption signal this process received (here or in the trainer), or None."""
        from dist_train.faults import signals_received

        received = signals_received()
        return next(iter(received.values()), None)

    @classmethod
    def install(cls, preempt_signal: int) -> "PreemptionGuard":
        from dist_train.faults import REQUEUE_SIGNALS

        assert preempt_signal in REQUEUE_SIGNALS, f"{signal.Signals(preempt_signal).name} is not a requeue signal"
        guard = cls(preempt_signal)
        previous = signal.getsignal(preempt_signal)
        guard._submitit_handler = previous if callable(previous) else None
        signal.signal(preempt_signal, guard._note)
        previous_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, functools.partial(guard._note, previous=previous_term))
        if preempt_signal not in _shielded_forks:  # register_at_fork cannot be undone: once per process
            _shielded_forks.add(preempt_signal)
            os.register_at_fork(after_in_child=lambda: signal.signal(preempt_signal, signal.SIG_IGN))
        return guard

    def _note(self, signum: int, frame: Any, *, previous: Any = None) -> None:
        from dist_train.faults import record_signal

        log.warning("received %s: the trainer checkpoints after this step, then the job %s", signal.Signals(signum).name,
                    "is requeued" if signum == self.preempt_signal else "stops")
        record_signal(signum)
        if callable(previous):  # submitit's SIGTERM handler only logs; a default action is not taken
            previous(signum, frame)

    def requeue(self) -> None:
        """After the checkpoint: rank 0 runs submitit's USR2 handler (``checkpoint()``, then ``scontrol requeue``).
        Its closing ``sys.exit`` is caught, so that the caller leaves through ``leave_without_result``: a
        normal interpreter exit could wait on library threads (a gloo group) until SLURM's KillWait ends."""
        if self._submitit_handler is None or os.environ.get("RANK", "0") != "0":
            return
        try:
            self._submitit_handler(self.preempt_signal, None)
        except SystemExit:
            pass

    def leave_without_result(self, err: BaseException) -> None:
        """Exit now, so that submitit writes no result for this attempt. Never returns."""
        log.warning("%s: %s after %s; the job is being requeued or cancelled, so this attempt leaves "
                    "without a result", type(err).__name__, err, self.signalled)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
