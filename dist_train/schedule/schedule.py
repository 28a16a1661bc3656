"""The schedule: a pure map from samples seen to (lr, global batch, momentum). No torch import.

Progress is measured in samples, not steps, because steps change length when the batch grows;
epochs are samples / N, and milestones and the cosine's length are in epochs. For the adaptive mode
the batch is decided online by ``BatchSizeController`` and passed in, so the schedule itself stays pure.
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass

from dist_train.schedule.config import COSINE_MODES, ScheduleConfig
from dist_train.schedule.rules import (
    OptimizerFamily,
    analytic_noise_scale,
    lr_scale,
    momentum_rule_batch_size,
    round_to_granularity,
)


@dataclass(frozen=True)
class ScheduleState:
    """What the trainer applies to the next optimizer step."""

    epoch: float
    """Samples seen / dataset size."""
    lr: float
    """Learning rate for the optimizer's param groups (warmup included)."""
    global_batch_size: int
    """Samples per optimizer step over all ranks; a multiple of the batch granularity."""
    momentum: float
    """Momentum coefficient (m for sgd, beta1 / beta for the normalised family)."""
    noise_scale: float
    """The analytic noise scale g of this state, for logging (see ``rules.analytic_noise_scale``)."""
    milestones_passed: int
    """How many milestones lie at or before ``epoch`` (always 0 in the cosine modes)."""


@dataclass(frozen=True)
class _Phase:
    lr: float
    global_batch_size: int


class Schedule:
    """Maps samples seen to a ``ScheduleState``; see docs/schedule.md for the modes and rules.

    Args:
        cfg: the schedule section of the config.
        base_lr: ``optim.lr``: the lr at ``base_global_batch_size``, or at ``cfg.reference_global_batch_size``
            when ``cfg.lr_scaling`` is on.
        base_momentum: ``optim.momentum``.
        base_global_batch_size: ``train.global_batch_size``, the starting batch before the momentum rule.
        dataset_size: N, training samples per epoch.
        optimizer_family: ``sgd`` or ``normalized`` (``rules.optimizer_family(optim.name)``).
        batch_granularity: micro_batch_size x world size; every batch produced is a multiple of it.
            Batches the milestones or the cosine twin ask for are rounded to the nearest multiple (a warning
            says so when that moves them by more than 1%); the base batch and the cap must be multiples already.
        total_epochs: ``train.epochs``, the length the cosine modes decay over; None (or 0) is refused by them
            and ignored by the others.
    """

    def __init__(self, cfg: ScheduleConfig, *, base_lr: float, base_momentum: float, base_global_batch_size: int,
                 dataset_size: int, optimizer_family: OptimizerFamily, batch_granularity: int,
                 total_epochs: float | None = None):
        _check_arguments(cfg, base_lr=base_lr, base_momentum=base_momentum, dataset_size=dataset_size,
                         base_global_batch_size=base_global_batch_size, batch_granularity=batch_granularity,
                         optimizer_family=optimizer_family)
        _check_total_epochs(cfg, total_epochs)
        self.cfg = cfg
        self.dataset_size = dataset_size
        self.total_epochs = total_epochs
        self.optimizer_family: OptimizerFamily = optimizer_family
        self.batch_granularity = batch_granularity
        self.start_lr = base_lr * lr_scale(base_global_batch_size / cfg.reference_global_batch_size,
                                          scaling=cfg.lr_scaling)
        self.momentum = base_momentum
        self.start_global_batch_size = base_global_batch_size
        if cfg.momentum_rule_momentum is not None:
            # Trade momentum for batch at the same noise scale; the lr stays (docs/theory.md section 1).
            self.momentum = cfg.momentum_rule_momentum
            self.start_global_batch_size = momentum_rule_batch_size(
                base_global_batch_size, momentum=base_momentum, new_momentum=cfg.momentum_rule_momentum,
                family=optimizer_family, batch_granularity=batch_granularity)
        cap = cfg.max_global_batch_size
        if cap and self.start_global_batch_size > cap:
            raise ValueError(f"the starting global batch {self.start_global_batch_size} exceeds "
                             f"schedule.max_global_batch_size={cap}; raise the cap or lower the batch")
        self._milestone_samples = [m * dataset_size for m in cfg.milestones_epochs]
        self._phases = self._build_phases()
        if cfg.mode == "increase_batch_cosine":
            self._warn_twin_rounding()

    # --- the map --------------------------------------------------------------------------------
    def state_at(self, samples_seen: int, *, global_batch_size: int | None = None) -> ScheduleState:
        """The state for the step that starts after ``samples_seen`` samples.

        ``global_batch_size`` is the controller's batch in ``adaptive`` mode (required there, refused
        elsewhere, where the schedule decides the batch).
        """
        if samples_seen < 0:
            raise ValueError(f"samples_seen={samples_seen} must be >= 0")
        epoch = samples_seen / self.dataset_size
        passed = bisect.bisect_right(self._milestone_samples, samples_seen)
        if self.cfg.mode in COSINE_MODES:
            phase = self._cosine_phase(epoch)
        else:
            phase = self._phases[passed]
        lr, batch = phase.lr, phase.global_batch_size
        if self.cfg.mode == "adaptive":
            batch = self._check_adaptive_batch(global_batch_size)
            lr *= lr_scale(batch / self.start_global_batch_size, scaling=self.cfg.adaptive.lr_scaling)
        elif global_batch_size is not None:
            raise ValueError(f"global_batch_size is decided by the schedule in mode {self.cfg.mode!r}; "
                             "pass it only in adaptive mode")
        lr *= self._warmup_factor(epoch)
        return ScheduleState(
            epoch=epoch, lr=lr, global_batch_size=batch, momentum=self.momentum, milestones_passed=passed,
            noise_scale=analytic_noise_scale(lr=lr, global_batch_size=batch, momentum=self.momentum,
                                             dataset_size=self.dataset_size, family=self.optimizer_family))

    def _warmup_factor(self, epoch: float) -> float:
        warmup = self.cfg.warmup_epochs
        if warmup <= 0 or epoch >= warmup:
            return 1.0
        start = self.cfg.warmup_start_factor
        return start + (1.0 - start) * epoch / warmup

    def _check_adaptive_batch(self, global_batch_size: int | None) -> int:
        if global_batch_size is None:
            raise ValueError("adaptive mode: pass global_batch_size=controller.global_batch_size to state_at")
        if global_batch_size % self.batch_granularity or global_batch_size > self.cfg.max_global_batch_size:
            raise ValueError(f"adaptive global_batch_size={global_batch_size} must be a multiple of "
                             f"{self.batch_granularity} and at most {self.cfg.max_global_batch_size}")
        return global_batch_size

    # --- the phases between milestones ---------------------------------------------------------
    def _build_phases(self) -> list[_Phase]:
        """(lr, B) before the first milestone and after each one, warmup aside."""
        mode, cap = self.cfg.mode, self.cfg.max_global_batch_size
        lr0, b0 = self.start_lr, self.start_global_batch_size
        phases, total = [_Phase(lr0, b0)], 1.0
        for k, f in enumerate(self.cfg.milestone_factors, start=1):
            total *= f  # the noise scale at milestone k is g0 / total, whatever the mode
            wanted = b0 * total
            if mode in ("decay_lr", "adaptive"):
                phases.append(_Phase(lr0 / total, b0))
            elif mode == "increase_batch" and cap and wanted > cap:
                raise ValueError(f"increase_batch: milestone {k} asks for a global batch of {wanted:g}, above "
                                 f"schedule.max_global_batch_size={cap}; use mode 'hybrid' to decay the lr "
                                 "from the cap on, or raise the cap")
            elif cap and wanted > cap:
                # Hybrid at the cap: the lr takes over what the batch cannot, so g follows decay_lr's path.
                phases.append(_Phase(lr0 * cap / wanted, cap))
            else:
                phases.append(_Phase(lr0, self._rounded(wanted, k)))
        return phases

    # --- the cosine modes --------------------------------------------------------------------------
    def _cosine_factor(self, epoch: float) -> float:
        """The cosine's multiplier of the start lr at ``epoch``, warmup aside: 1 until the warmup ends, then
        down along half a cosine to ``cfg.cosine_final_lr_factor`` at ``total_epochs``, and that from there on."""
        assert self.total_epochs is not None, "only the cosine modes have a cosine"
        warmup, final = self.cfg.warmup_epochs, self.cfg.cosine_final_lr_factor
        progress = min(max((epoch - warmup) / (self.total_epochs - warmup), 0.0), 1.0)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _cosine_phase(self, epoch: float) -> _Phase:
        """(lr, B) at ``epoch``, warmup aside. The twin turns the cosine's lr factor c into a batch factor 1/c:
        g = lr N / (B (1 - m)) then follows the cosine run's path against samples seen. From the cap on, the lr
        takes the part of 1/c the batch cannot, as hybrid does at a milestone."""
        c, lr0, b0 = self._cosine_factor(epoch), self.start_lr, self.start_global_batch_size
        if self.cfg.mode == "cosine":
            return _Phase(lr0 * c, b0)
        cap = self.cfg.max_global_batch_size
        if c * cap < b0:  # b0 / c > cap, written without dividing by a c that may reach 0
            return _Phase(lr0 * c * cap / b0, cap)
        # Rounded from b0 / c at every step (no error adds up); the cap is a multiple, so this stays at or below it.
        return _Phase(lr0, round_to_granularity(b0 / c, batch_granularity=self.batch_granularity))

    def _warn_twin_rounding(self) -> None:
        # Rounding to the nearest multiple moves B by at most half a granule, so g is off by at most
        # G / (2 B): worst at the start, where B is smallest, and shrinking as the batch grows.
        b0, granularity = self.start_global_batch_size, self.batch_granularity
        worst = granularity / (2 * b0)
        if worst > 0.01 and self.cfg.max_global_batch_size > b0:
            warnings.warn(f"increase_batch_cosine: the global batch is rounded at every step to a multiple of "
                          f"micro_batch_size x world size = {granularity}; near the start batch {b0} that moves the "
                          f"noise scale by up to {100 * worst:.1f}% from the cosine's (less as B grows); a larger "
                          f"train.global_batch_size or a smaller micro_batch_size x world size reduces it",
                          stacklevel=3)

    def _rounded(self, wanted: float, milestone: int) -> int:
        batch = round_to_granularity(wanted, batch_granularity=self.batch_granularity)
        if abs(batch - wanted) > 0.01 * wanted:
            warnings.warn(f"schedule milestone {milestone}: global batch {wanted:g} rounded to {batch}, a multiple "
                          f"of micro_batch_size x world size = {self.batch_granularity}; the noise scale there "
                          f"is {wanted / batch:.3f} x the planned one", stacklevel=3)
        return batch


def _check_arguments(cfg: ScheduleConfig, *, base_lr: float, base_momentum: float, base_global_batch_size: int,
                     dataset_size: int, batch_granularity: int, optimizer_family: str) -> None:
    if not (base_lr > 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr={base_lr} must be finite and > 0")
    if not 0.0 <= base_momentum < 1.0:
        raise ValueError(f"base_momentum={base_momentum} must be in [0, 1)")
    if dataset_size < 1:
        raise ValueError(f"dataset_size={dataset_size} must be >= 1")
    if batch_granularity < 1:
        raise ValueError(f"batch_granularity={batch_granularity} must be >= 1 (micro_batch_size x world size)")
    if base_global_batch_size < 1 or base_global_batch_size % batch_granularity:
        raise ValueError(f"train.global_batch_size={base_global_batch_size} must be a positive multiple of "
                         f"micro_batch_size x world size = {batch_granularity}")
    if cfg.max_global_batch_size % batch_granularity:
        raise ValueError(f"schedule.max_global_batch_size={cfg.max_global_batch_size} must be a multiple of "
                         f"micro_batch_size x world size = {batch_granularity}")
    if optimizer_family not in ("sgd", "normalized"):
        raise ValueError(f"optimizer_family={optimizer_family!r} must be 'sgd' or 'normalized'")
    if cfg.momentum_rule_momentum is not None and optimizer_family != "sgd":
        raise ValueError("schedule.momentum_rule_momentum applies to momentum SGD: with normalised momentum "
                         "(radam, qhm, adamw) beta does not change the noise scale alpha N / B, so there is no "
                         "batch to trade for it; remove the setting, or grow B with lr_scaling='linear'")


def _check_total_epochs(cfg: ScheduleConfig, total_epochs: float | None) -> None:
    if cfg.mode not in COSINE_MODES:
        return
    if total_epochs is None or not (math.isfinite(total_epochs) and total_epochs > cfg.warmup_epochs):
        raise ValueError(f"schedule.mode={cfg.mode!r} decays over the whole run: it needs total_epochs = train.epochs "
                         f"> schedule.warmup_epochs={cfg.warmup_epochs:g}, got {total_epochs}; set train.epochs "
                         "(train.max_steps alone gives the cosine no length)")
