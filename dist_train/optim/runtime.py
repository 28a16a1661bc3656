"""What the trainer does to a built optimizer while it runs: set hyperparameters, evaluate with
Lookahead's slow weights, and measure the optimizer state this rank holds."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.optim import Optimizer


def set_hyperparams(optimizer: Optimizer, *, lr: float, momentum: float) -> None:
    """Set the learning rate and the momentum coefficient on every parameter group.

    The momentum coefficient is what the optimizer calls momentum: for sgd, m in torch's unnormalised
    buffer ``b = m b + g`` (the effective lr is lr / (1 - m), docs/theory.md section 1); for radam and adamw,
    beta1 of the normalised first moment ``m = beta1 m + (1 - beta1) g``; for qhm, beta of the normalised
    buffer ``d = beta d + (1 - beta) g``. Works through Lookahead (shared groups) and the sharded optimizer
    (its groups reach the local optimizer at the next step).
    """
    if not 0.0 <= momentum < 1.0 or lr < 0:  # lr = 0 is legal: warmup may start there
        raise ValueError(f"set_hyperparams needs lr >= 0 and momentum in [0, 1); got lr={lr}, momentum={momentum}")
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum
        else:
            raise ValueError(f"{type(optimizer).__name__} has no momentum coefficient to set")


def has_slow_weights(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` is Lookahead, directly or as the local optimizer of the sharded one."""
    from dist_train.optim.lookahead import Lookahead

    return isinstance(optimizer, Lookahead) or isinstance(getattr(optimizer, "local", None), Lookahead)


def slow_weights(optimizer: Optimizer) -> ContextManager[None]:
    """Within the block the model holds Lookahead's slow weights (evaluate or export them there); the fast
    weights come back afterwards. A no-op without Lookahead. Collective for the sharded optimizer."""
    swap = getattr(optimizer, "slow_weights", None)
    return swap() if swap is not None else contextlib.nullcontext()


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of optimizer state tensors held by this rank (moments, slow weights; only the shard when sharded)."""
    return sum(v.numel() * v.element_size() for entries in optimizer.state.values()
               for v in entries.values() if isinstance(v, torch.Tensor))
