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


def param_groups(model: torch.nn.Module, *, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Two groups: weights with ``weight_decay``, then biases and normalisation weights (every parameter
    with at most one dimension) without. ``decay_norm_and_bias`` makes it one group, every parameter in
    ``model.parameters()`` order with ``weight_decay``. Empty groups are left out; frozen parameters too."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        groups = [{"params": trainable, "weight_decay": weight_decay}]
    else:
        groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
                  {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, *, shard: bool = False) -> Optimizer:
    """The optimizer ``cfg`` describes for ``model``'s parameters.

    ``shard=True`` shards the optimizer state over the default process group (ZeRO-1, for DDP; gradients
    must be averaged before ``step``). Without a process group, or at world size 1, it builds the plain
    optimizer, whose state dict is the one the sharded optimizer saves and loads.
    """
    groups = param_groups(model, weight_decay=cfg.weight_decay, decay_norm_and_bias=cfg.weight_decay_norm_and_bias)
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
