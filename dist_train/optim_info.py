"""One table of facts about each optimizer ``optim.name`` can choose, as timm's ``OptimInfo``.

The config check, the factory and the schedule's momentum family all read this table, so a new
optimizer is one entry here (and one name in ``OptimConfig.name``). It imports no torch: the schedule
reads it, and ``dist_train.schedule`` stays torch-free; each ``build`` imports what it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from dist_train.optim.config import OptimConfig


@dataclass(frozen=True)
class OptimInfo:
    name: str
    build: Callable[[list[dict[str, Any]], OptimConfig], Optimizer]
    """The optimizer over parameter groups, from the config (Lookahead and sharding wrap it later)."""
    family: Literal["sgd", "normalized"]
    """How it writes momentum: ``sgd`` is torch's unnormalised buffer, ``normalized`` averages with weights
    that sum to one (docs/theory.md section 1); the momentum rule applies to ``sgd`` only."""
    weight_decay: Literal["l2", "decoupled", "either"]
    """Which weight decay it offers: only L2, only decoupled, or either (``optim.decoupled_weight_decay``)."""
    nesterov: bool = False
    """Whether ``optim.nesterov`` applies."""


def _sgd(groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    import torch

    # torch's SGD and AdamW are used as they are: with a constant momentum they are what we want, and on
    # CPU they take the multi-tensor path only when asked (foreach=True).
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, foreach=True)


def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    import torch

    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=True)


def _radam(groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    from dist_train.optim.radam import RAdam

    return RAdam(groups, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                 decoupled_weight_decay=cfg.decoupled_weight_decay)


def _qhm(groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    from dist_train.optim.qhm import QHM

    return QHM(groups, lr=cfg.lr, momentum=cfg.momentum, nu=cfg.qhm_nu, weight_decay=cfg.weight_decay,
               decoupled_weight_decay=cfg.decoupled_weight_decay)


OPTIMIZERS: dict[str, OptimInfo] = {info.name: info for info in (
    OptimInfo("sgd", _sgd, family="sgd", weight_decay="l2", nesterov=True),  # torch.optim.SGD
    OptimInfo("radam", _radam, family="normalized", weight_decay="either"),  # ours: dist_train/optim/radam.py
    OptimInfo("qhm", _qhm, family="normalized", weight_decay="either"),  # ours: dist_train/optim/qhm.py
    OptimInfo("adamw", _adamw, family="normalized", weight_decay="decoupled"),  # torch.optim.AdamW
)}


def optim_info(name: str) -> OptimInfo:
    """The facts of ``optim.name``; a ValueError naming the known ones for anything else."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer optim.name={name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
