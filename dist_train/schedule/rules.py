"""The scaling rules of docs/theory.md section 1 as pure functions (no torch import).

Two optimizer families write momentum differently, and the rules differ with them:

``sgd`` (momentum SGD, PyTorch form, unnormalised):
    v <- m v + g ;  theta <- theta - eps v
    A gradient's total contribution is eps / (1 - m), so the effective lr is eps / (1 - m) and the noise
    scale is g = eps N / (B (1 - m)). The momentum rule B ~ 1 / (1 - m) holds: raising m at fixed eps raises
    the effective lr, and the batch can grow by the same factor.

``normalized`` (RAdam and Adam's beta1, QHM's beta: d <- beta d + (1 - beta) g):
    The (1 - beta) factor already normalises the average, so the effective lr is alpha itself and the noise
    scale is g = alpha N / B, independent of beta. Raising beta therefore keeps g at the same batch: the
    momentum rule has no batch to trade. (Normalised momentum with lr alpha equals unnormalised momentum with
    eps = alpha (1 - beta), which makes the two formulas agree.) For RAdam and Adam, the adaptive
    preconditioner also rescales each coordinate, so g is a nominal value there, comparable between runs of
    the same optimizer only.

Both formulas drop the -1 of eps (N/B - 1): the error is B/N, small below the B ~ N/10 where growing the
batch stops paying (Smith et al.).
"""

from __future__ import annotations

import math
from typing import Literal

OptimizerFamily = Literal["sgd", "normalized"]
FAMILIES: tuple[str, ...] = ("sgd", "normalized")


def optimizer_family(optimizer_name: str) -> OptimizerFamily:
    """The momentum family of ``optim.name`` (``dist_train.optim_info``): ``sgd`` for momentum SGD,
    ``normalized`` for radam, qhm and adamw."""
    from dist_train.optim_info import OPTIMIZERS

    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"no momentum family is known for optimizer {optimizer_name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[optimizer_name].family


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"optimizer family {family!r} is not one of {FAMILIES}")


def effective_lr(lr: float, *, momentum: float, family: OptimizerFamily) -> float:
    """The step a constant gradient takes in steady state, per unit gradient: eps/(1-m) for sgd, alpha else."""
    _check_family(family)
    return lr / (1.0 - momentum) if family == "sgd" else lr


def analytic_noise_scale(*, lr: float, global_batch_size: int, momentum: float, dataset_size: int,
                         family: OptimizerFamily) -> float:
    """The SGD noise scale g = effective_lr x N / B (Smith et al.; see the module docstring for the families)."""
    if global_batch_size < 1 or dataset_size < 1:
        raise ValueError("global_batch_size and dataset_size must be >= 1")
    return effective_lr(lr, momentum=momentum, family=family) * dataset_size / global_batch_size


def lr_scale(ratio: float, *, scaling: str) -> float:
    """The lr multiplier for a batch ``ratio`` times larger: 1 (none), ratio (linear) or sqrt(ratio)."""
    if scaling == "none":
        return 1.0
    if scaling == "linear":
        return ratio
    if scaling == "sqrt":
        return math.sqrt(ratio)
    raise ValueError(f"lr scaling {scaling!r} is not one of none, linear, sqrt")


def round_to_granularity(global_batch_size: float, *, batch_granularity: int) -> int:
    """The multiple of ``batch_granularity`` nearest to ``global_batch_size`` (halves round up), at least one."""
    if batch_granularity < 1:
        raise ValueError(f"batch_granularity={batch_granularity} must be >= 1 (micro_batch_size x world size)")
    multiples = max(1, math.floor(global_batch_size / batch_granularity + 0.5))
    return multiples * batch_granularity


def momentum_rule_batch_size(global_batch_size: int, *, momentum: float, new_momentum: float,
                             family: OptimizerFamily = "sgd", batch_granularity: int = 1) -> int:
    """The batch B' that keeps the noise scale when the momentum goes from ``momentum`` to ``new_momentum``.

    For ``sgd``, B' = B (1 - m) / (1 - m'), rounded to a multiple of ``batch_granularity``:
    (0.9, 8192) -> (0.95, 16384) -> (0.975, 32768). For ``normalized`` momentum g does not depend on beta,
    so B' = B.
    """
    _check_family(family)
    for name, m in (("momentum", momentum), ("new_momentum", new_momentum)):
        if not 0.0 <= m < 1.0:
            raise ValueError(f"{name}={m} must be in [0, 1)")
    if family == "normalized":
        return global_batch_size
    return round_to_granularity(global_batch_size * (1.0 - momentum) / (1.0 - new_momentum),
                                batch_granularity=batch_granularity)
