"""Noise-scale schedules: grow the batch instead of decaying the lr (docs/theory.md sections 1-2). No torch import.

The trainer's contract::

    family = optimizer_family(cfg.optim.name)                      # "sgd" or "normalized"
    sched = Schedule(cfg.schedule, base_lr=cfg.optim.lr, base_momentum=cfg.optim.momentum,
                     base_global_batch_size=cfg.train.global_batch_size, dataset_size=N,
                     optimizer_family=family, batch_granularity=micro_batch_size * world_size,
                     total_epochs=cfg.train.epochs)     # the length the cosine modes decay over
    state = sched.state_at(samples_seen)     # ScheduleState: lr, global_batch_size, momentum, epoch, noise_scale

In ``adaptive`` mode the batch comes from a controller fed by the measured noise scale
(``dist_train.noise_scale.GradientNoiseScale``)::

    ctl = BatchSizeController(cfg.schedule.adaptive, start_global_batch_size=sched.start_global_batch_size,
                              max_global_batch_size=cfg.schedule.max_global_batch_size,
                              batch_granularity=micro_batch_size * world_size)
    state = sched.state_at(samples_seen, global_batch_size=ctl.global_batch_size)
    ...                                       # one optimizer step, then
    ctl.update(step=step, b_simple=noise.b_simple)

``analytic_noise_scale`` (also ``state.noise_scale``) is the g the trainer logs every step.
"""

from dist_train.schedule.adaptive import BatchSizeController
from dist_train.schedule.config import AdaptiveConfig, NoiseScaleConfig, ScheduleConfig
from dist_train.schedule.rules import (
    OptimizerFamily,
    analytic_noise_scale,
    effective_lr,
    momentum_rule_batch_size,
    optimizer_family,
    round_to_granularity,
)
from dist_train.schedule.schedule import Schedule, ScheduleState

__all__ = [
    "AdaptiveConfig", "BatchSizeController", "NoiseScaleConfig", "OptimizerFamily", "Schedule", "ScheduleConfig",
    "ScheduleState", "analytic_noise_scale", "effective_lr", "momentum_rule_batch_size", "optimizer_family",
    "round_to_granularity",
]
