"""Quasi-hyperbolic momentum, docs/theory.md section 5 (Gitman et al. 2019; Ma and Yarats 2019).

    d_t     = beta d_{t-1} + (1 - beta) g_t          (d_0 = 0)
    theta_t = theta_{t-1} - lr [(1 - nu) g_t + nu d_t]

``nu`` is gamma in docs/theory.md (config ``qhm_nu``): nu=1 is normalised heavy ball, i.e. torch SGD with
momentum beta and lr * (1 - beta); nu=beta is Nesterov in the same normalisation; nu=0 is plain
SGD. Torch has no QHM, hence this file.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.optim import Optimizer

from dist_train.optim.weight_decay import apply_weight_decay


class QHM(Optimizer):
    """QHM; per-group keys ``lr``, ``momentum`` (beta), ``nu``, ``weight_decay``, ``decoupled_weight_decay``.

    Weight decay is L2 (``g += wd * theta``, so it also enters the momentum buffer) or, when decoupled,
    ``theta *= 1 - lr * wd`` before the update.
    """

    def __init__(self, params, *, lr: float, momentum: float = 0.9, nu: float = 0.7, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False) -> None:
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"QHM needs lr > 0 and weight_decay >= 0; got {lr}, {weight_decay}")
        if not (0.0 <= momentum < 1.0 and 0.0 <= nu <= 1.0):
            raise ValueError(f"QHM needs momentum in [0, 1) and nu in [0, 1]; got {momentum}, {nu}")
        defaults = dict(lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise ValueError("QHM does not support sparse gradients")
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            _qhm_update(params, [p.grad for p in params], buffers, group=group)
        return loss


def _qhm_update(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor], *,
                group: dict) -> None:
    lr, beta, nu = group["lr"], group["momentum"], group["nu"]
    grads = apply_weight_decay(params, grads, group=group)
    torch._foreach_lerp_(buffers, grads, 1.0 - beta)  # d = beta d + (1 - beta) g
    if nu != 1.0:
        torch._foreach_add_(params, grads, alpha=-lr * (1.0 - nu))
    if nu != 0.0:
        torch._foreach_add_(params, buffers, alpha=-lr * nu)
