"""Weight decay shared by our foreach optimizers: L2 (added to the gradient) or decoupled (AdamW-style)."""

from __future__ import annotations

import torch


def apply_weight_decay(params: list[torch.Tensor], grads: list[torch.Tensor], *, group: dict) -> list[torch.Tensor]:
    """Decoupled decay shrinks ``params`` in place by lr x wd; L2 returns new gradients g + wd x theta."""
    weight_decay = group["weight_decay"]
    if not weight_decay:
        return grads
    if group["decoupled_weight_decay"]:
        torch._foreach_mul_(params, 1.0 - group["lr"] * weight_decay)
        return grads
    return list(torch._foreach_add(grads, params, alpha=weight_decay))
