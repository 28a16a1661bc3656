"""The adaptive batch-size decision: grow B when the measured noise scale says B is small. No torch import.

McCandlish et al.: below the critical batch (estimated by B_simple) a larger batch needs
proportionally fewer steps, so growing it wastes little compute; above it, extra samples buy
little. The controller holds the only state of the adaptive mode (the current batch and the
step of the last growth); ``Schedule.state_at`` turns its batch into an lr.
"""

from __future__ import annotations

import math
from typing import Any

from dist_train.schedule.config import AdaptiveConfig
from dist_train.schedule.rules import round_to_granularity


class BatchSizeController:
    """Grows the global batch by ``cfg.growth_factor`` when B_simple > ``cfg.margin`` x B.

    At most once every ``cfg.min_steps_between_growths`` optimizer steps (counted from step 0 too, so
    the noise-scale averages have settled before the first decision), never past ``max_global_batch_size``.
    A grown batch is rounded to the nearest multiple of ``batch_granularity``, at least one multiple above the
    current batch, at most the cap (a multiple itself).
    """

    def __init__(self, cfg: AdaptiveConfig, *, start_global_batch_size: int, max_global_batch_size: int,
                 batch_granularity: int):
        if batch_granularity < 1 or start_global_batch_size % batch_granularity \
                or max_global_batch_size % batch_granularity:
            raise ValueError(f"start_global_batch_size={start_global_batch_size} and max_global_batch_size="
                             f"{max_global_batch_size} must be multiples of batch_granularity={batch_granularity}")
        if not 0 < start_global_batch_size <= max_global_batch_size:
            raise ValueError(f"need 0 < start_global_batch_size={start_global_batch_size} <= "
                             f"max_global_batch_size={max_global_batch_size}")
        self.cfg = cfg
        self.max_global_batch_size = max_global_batch_size
        self.batch_granularity = batch_granularity
        self._global_batch_size = start_global_batch_size
        self._last_growth_step = 0

    @property
    def global_batch_size(self) -> int:
        """The batch to train with now; pass it to ``Schedule.state_at(..., global_batch_size=...)``."""
        return self._global_batch_size

    def update(self, *, step: int, b_simple: float | None) -> bool:
        """Decide after optimizer step ``step`` (counted from 1); True when the batch grew.

        ``b_simple`` is the smoothed estimate (``GradientNoiseScale.b_simple``); None or a non-finite value
        (not measured yet, or |G|^2 not positive) means no decision.
        """
        if b_simple is None or not math.isfinite(b_simple):
            return False
        threshold = self.threshold_at(step)
        if threshold is None or b_simple <= threshold:
            return False
        self.grow(step)
        return True

    def threshold_at(self, step: int) -> float | None:
        """The B_simple above which the batch grows after optimizer step ``step``; None when it cannot grow
        then (too soon after the last growth, or at the cap). The trainer compares on the device
        (``GradientNoiseScale.b_simple_exceeds``) and reads the answer with the step's flags: no host sync of
        its own."""
        if step - self._last_growth_step < self.cfg.min_steps_between_growths:
            return None
        batch = self._global_batch_size
        return None if batch >= self.max_global_batch_size else self.cfg.margin * batch

    def grow(self, step: int) -> None:
        """Grow the batch after optimizer step ``step`` (the caller found B_simple above ``threshold_at``)."""
        batch = self._global_batch_size
        grown = max(round_to_granularity(batch * self.cfg.growth_factor, batch_granularity=self.batch_granularity),
                    batch + self.batch_granularity)
        self._global_batch_size = min(grown, self.max_global_batch_size)
        self._last_growth_step = step

    def state_dict(self) -> dict[str, Any]:
        return {"global_batch_size": self._global_batch_size, "last_growth_step": self._last_growth_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"global_batch_size", "last_growth_step"}:
            raise KeyError(f"BatchSizeController state has keys {sorted(state)}; "
                           "expected ['global_batch_size', 'last_growth_step']")
        batch = int(state["global_batch_size"])
        if batch % self.batch_granularity or batch > self.max_global_batch_size:
            raise ValueError(f"saved global batch {batch} is not a multiple of {self.batch_granularity} at most "
                             f"{self.max_global_batch_size}; resume with the same micro batch, world size and cap")
        self._global_batch_size = batch
        self._last_growth_step = int(state["last_growth_step"])
