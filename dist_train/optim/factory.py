"""Build the optimizer the config names: parameter groups, the optimizer, Lookahead, sharding."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from dist_train.optim.config import OptimConfig
from dist_train.optim.lookahead import Lookahead
from dist_train.optim.sharded import ShardedOptimizer
from dist_train.optim_info import optim_info


def param_groups(model: torch.nn.Module, *, weight_decay: float) -> list[dict]:
    """Two groups: weights with ``weight_decay``, then biases and normalisation weights (every parameter
    with at most one dimension) without. Empty groups are left out; frozen parameters too."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, *, shard: bool = False) -> Optimizer:
    """The optimizer ``cfg`` describes for ``model``'s parameters.

    ``shard=True`` shards the optimizer state over the default process group (ZeRO-1, for DDP; gradients
    must be averaged before ``step``). Without a process group, or at world size 1, it builds the plain
    optimizer, whose state dict is the one the sharded optimizer saves and loads.
    """
    groups = param_groups(model, weight_decay=cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    make_local = functools.partial(_build_local, cfg=cfg)
    if shard and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ShardedOptimizer(groups, make_local)
    return make_local(groups)


def _build_local(groups: list[dict], *, cfg: OptimConfig) -> Optimizer:
    optimizer = _build_inner(groups, cfg)
    if cfg.lookahead is not None:
        optimizer = Lookahead(optimizer, k=cfg.lookahead.k, alpha=cfg.lookahead.alpha)
    return optimizer


def _build_inner(groups: list[dict], cfg: OptimConfig) -> Optimizer:
    return optim_info(cfg.name).build(groups, cfg)
