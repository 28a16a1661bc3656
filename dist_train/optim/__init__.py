"""Optimizers: RAdam, QHM, torch's SGD and AdamW, optional Lookahead, optional sharded state (ZeRO-1).

docs/theory.md sections 3-5 define them; docs/optimizers.md shows the settings and measurements.
"""

from dist_train.optim.config import LookaheadConfig, OptimConfig
from dist_train.optim.factory import build_optimizer, param_groups
from dist_train.optim.runtime import has_slow_weights, optimizer_state_bytes, set_hyperparams, slow_weights

__all__ = [
    "LookaheadConfig",
    "OptimConfig",
    "build_optimizer",
    "has_slow_weights",
    "optimizer_state_bytes",
    "param_groups",
    "set_hyperparams",
    "slow_weights",
]
