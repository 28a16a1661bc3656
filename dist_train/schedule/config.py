"""Schedule config (no torch import).

The schedule turns the noise-scale ideas of docs/theory.md section 1 into settings: which way the
noise scale falls, at milestones or along a cosine (lr decay, batch growth, or both), the linear
scaling rule, warmup, the momentum rule, and the adaptive batch growth driven by the measured
gradient noise scale (docs/theory.md section 2). docs/schedule.md shows each setting with a worked example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

LrScaling = Literal["none", "linear", "sqrt"]
COSINE_MODES: tuple[str, ...] = ("cosine", "increase_batch_cosine")
"""The modes that follow a cosine over the whole run instead of milestones."""
DEFAULT_FACTOR = 10.0


@dataclass(frozen=True)
class NoiseScaleConfig:
    enabled: bool = False
    """Measure the gradient noise scale B_simple every step and log it (one extra scalar all-reduce per step)."""
    ema_decay: float = 0.99
    """Decay of the moving averages of |G|^2 and tr(Sigma); about 2/(1-decay) steps are averaged."""
    preconditioned: bool = False
    """Measure the noise of the step an Adam-type optimizer takes, P^-1 g with P = sqrt(v_hat) + eps from its
    second moments, instead of the raw gradient's: B_simple = tr(P^-1 Sigma P^-1) / |P^-1 G|^2 (docs/theory.md
    section 2). For radam and adamw (with or without Lookahead), with DDP and replicated optimizer state."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"schedule.noise_scale.ema_decay={self.ema_decay} must be in [0, 1), e.g. 0.99")


@dataclass(frozen=True)
class AdaptiveConfig:
    growth_factor: float = 2.0
    """Multiply the global batch by this factor when the measured noise scale says it is too small."""
    margin: float = 1.0
    """Grow when the smoothed B_simple exceeds ``margin`` x the current global batch."""
    min_steps_between_growths: int = 100
    """At least this many optimizer steps from the start, and between two growths (lets the averages settle)."""
    lr_scaling: LrScaling = "none"
    """How the lr follows a growth: ``none`` keeps it (the noise scale falls, as at a milestone), ``linear``
    scales it with B (keeps the noise scale), ``sqrt`` with sqrt(B)."""

    def __post_init__(self) -> None:
        if self.growth_factor <= 1.0:
            raise ValueError(f"schedule.adaptive.growth_factor={self.growth_factor} must be > 1, e.g. 2")
        if self.margin <= 0.0:
            raise ValueError(f"schedule.adaptive.margin={self.margin} must be > 0, e.g. 1")
        if self.min_steps_between_growths < 1:
            raise ValueError("schedule.adaptive.min_steps_between_growths must be >= 1")


@dataclass(frozen=True)
class ScheduleConfig:
    mode: Literal["constant", "decay_lr", "increase_batch", "hybrid", "adaptive", "cosine",
                  "increase_batch_cosine"] = "constant"
    """How the noise scale falls. At milestones: ``decay_lr`` divides the lr, ``increase_batch`` multiplies the
    batch, ``hybrid`` multiplies the batch up to ``max_global_batch_size`` and then divides the lr, ``adaptive``
    grows the batch when the measured noise scale says so (milestones then divide the lr). Continuously, over
    ``train.epochs`` and without milestones: ``cosine`` decays the lr along a cosine, ``increase_batch_cosine``
    grows the batch by the inverse of that cosine up to ``max_global_batch_size``, then decays the lr."""
    milestones_epochs: tuple[float, ...] = ()
    """Epochs at which the noise scale drops by ``factor`` (or by the matching entry of ``factors``)."""
    factor: float = DEFAULT_FACTOR
    """Factor applied at each milestone."""
    factors: tuple[float, ...] = ()
    """One factor per milestone, overriding ``factor``; e.g. ``[2, 10, 10]`` for B x2 then two lr decays."""
    max_global_batch_size: int = 0
    """Cap on the global batch (memory, hardware, about N/10); 0 means none. Needed by hybrid, adaptive and
    increase_batch_cosine."""
    cosine_final_lr_factor: float = 0.0
    """Where the cosine ends, at ``train.epochs``, as a fraction of the lr it starts from after warmup; in
    [0, 1). Used only by the two cosine modes (in ``increase_batch_cosine`` the noise scale ends at this
    fraction of its start)."""
    warmup_epochs: float = 0.0
    """Linear lr warmup over this many epochs (Goyal et al.), from ``warmup_start_factor`` x the lr."""
    warmup_start_factor: float = 0.0
    """Lr at the start of warmup as a fraction of the lr it ramps to; Goyal et al. start at base_lr, i.e. 1/k."""
    lr_scaling: LrScaling = "none"
    """Scale the base lr from ``reference_global_batch_size`` to the starting global batch: ``linear`` is
    lr = base_lr x B / B_ref (Goyal et al.; keeps the noise scale), ``sqrt`` uses sqrt(B / B_ref)."""
    reference_global_batch_size: int = 256
    """The global batch at which ``optim.lr`` was tuned; used only when ``lr_scaling`` is not ``none``."""
    momentum_rule_momentum: float | None = None
    """Momentum rule (momentum SGD only): raise the momentum to this value and scale the starting batch by
    (1 - m) / (1 - this), which keeps the noise scale; e.g. 0.9 -> 0.95 doubles B. Null disables it."""
    noise_scale: NoiseScaleConfig = field(default_factory=NoiseScaleConfig)
    """Measurement of the gradient noise scale (McCandlish et al.)."""
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    """Batch growth driven by the measured noise scale; used only when ``mode`` is ``adaptive``."""

    def __post_init__(self) -> None:
        self._check_milestones()
        if self.max_global_batch_size < 0:
            raise ValueError("schedule.max_global_batch_size must be >= 0 (0 means no cap)")
        if self.mode in ("hybrid", "adaptive") and self.max_global_batch_size == 0:
            raise ValueError(f"schedule.mode={self.mode!r} needs a cap: set schedule.max_global_batch_size > 0")
        self._check_cosine()
        if self.warmup_epochs < 0:
            raise ValueError("schedule.warmup_epochs must be >= 0")
        if not 0.0 <= self.warmup_start_factor <= 1.0:
            raise ValueError("schedule.warmup_start_factor must be in [0, 1]")
        if self.reference_global_batch_size < 1:
            raise ValueError("schedule.reference_global_batch_size must be >= 1, e.g. 256")
        if self.momentum_rule_momentum is not None and not 0.0 < self.momentum_rule_momentum < 1.0:
            raise ValueError(f"schedule.momentum_rule_momentum={self.momentum_rule_momentum} must be in (0, 1), "
                             "or null to disable the momentum rule")
        if self.mode == "adaptive" and not self.noise_scale.enabled:
            raise ValueError("schedule.mode='adaptive' grows the batch from the measured noise scale: "
                             "set schedule.noise_scale.enabled=true")
        if self.mode != "adaptive" and self.adaptive != AdaptiveConfig():
            raise ValueError("schedule.adaptive is set but schedule.mode is not 'adaptive'; "
                             "set schedule.mode=adaptive or remove schedule.adaptive")

    def _check_milestones(self) -> None:
        if self.factor <= 1.0:
            raise ValueError("schedule.factor must be > 1")
        if list(self.milestones_epochs) != sorted(self.milestones_epochs):
            raise ValueError("schedule.milestones_epochs must be increasing")
        if any(m <= 0 or not math.isfinite(m) for m in self.milestones_epochs):
            raise ValueError("schedule.milestones_epochs must be finite and > 0")
        if self.factors and len(self.factors) != len(self.milestones_epochs):
            raise ValueError(f"schedule.factors has {len(self.factors)} entries but schedule.milestones_epochs has "
                             f"{len(self.milestones_epochs)}; give one factor per milestone, or leave factors empty")
        if any(f <= 1.0 for f in self.factors):
            raise ValueError("every entry of schedule.factors must be > 1")
        if self.mode == "constant" and self.milestones_epochs:
            raise ValueError("schedule.milestones_epochs has no effect with schedule.mode='constant'; "
                             "choose decay_lr, increase_batch or hybrid, or remove the milestones")

    def _check_cosine(self) -> None:
        final = self.cosine_final_lr_factor
        if not (0.0 <= final < 1.0):  # also refuses nan
            raise ValueError(f"schedule.cosine_final_lr_factor={final} must be in [0, 1), e.g. 0 (decay to zero) "
                             "or 0.01; 1 would not decay at all, which is schedule.mode=constant")
        if self.mode not in COSINE_MODES:
            if final != 0.0:
                raise ValueError(f"schedule.cosine_final_lr_factor is set but schedule.mode={self.mode!r} is not "
                                 "a cosine mode; set schedule.mode=cosine or increase_batch_cosine, or remove it")
            return
        if self.milestones_epochs or self.factors or self.factor != DEFAULT_FACTOR:
            raise ValueError(f"schedule.mode={self.mode!r} decays along a cosine over train.epochs, so "
                             "schedule.milestones_epochs, factor and factors have no effect; remove them, or use "
                             "decay_lr, increase_batch or hybrid for a step schedule")
        if self.mode == "increase_batch_cosine" and self.max_global_batch_size == 0:
            raise ValueError("schedule.mode='increase_batch_cosine' needs a cap: the batch grows as 1 / (the "
                             "cosine's lr factor), without bound as the cosine nears zero; set "
                             "schedule.max_global_batch_size > 0 (e.g. about N/10), from where the lr takes over "
                             "the decay")

    @property
    def milestone_factors(self) -> tuple[float, ...]:
        """The factor at each milestone: ``factors`` if given, else ``factor`` repeated."""
        return self.factors or (self.factor,) * len(self.milestones_epochs)
