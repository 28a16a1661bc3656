"""RAdam (Liu et al., ICLR 2020), docs/theory.md section 3, with multi-tensor updates.

Why not ``torch.optim.RAdam``: its bias correction is ``1 - beta1**t`` with the *current* beta1,
which is wrong once the schedule changes the momentum during training (the momentum rule of
docs/theory.md section 1). The first moment is an exponential average with weights that sum to
``1 - prod_i beta1_i``, so that product is what we divide by. We keep it per parameter in the
state (``beta1_product``); with a constant beta1 it equals ``beta1**t`` and this optimizer matches
``torch.optim.RAdam`` (tests/test_optim_radam.py checks both). beta2 is not scheduled and is
taken as constant: rho_t is defined for a constant beta2 only.

Rectification threshold: the paper's derivation needs rho_t > 4, which makes r_t real, but the
variance approximation behind r_t is poor just above 4. We switch at rho_t > 5, as the official
code and ``torch.optim.RAdam`` do. rho_1 = 1 and rho_t < t afterwards, so the first five steps are
always momentum SGD; for the usual beta2 (0.99, 0.999) rho_5 ~ 4.99 and rho_6 ~ 5.99, so step 5 is the
step the two thresholds disagree on, and the tests pin it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from torch.optim import Optimizer

from dist_train.optim.weight_decay import apply_weight_decay

RHO_THRESHOLD = 5.0
"""Apply the rectified adaptive step only when rho_t exceeds this; below it, momentum SGD."""


def rho(step: int, beta2: float) -> float:
    """rho_t: length of the approximated simple moving average behind v_t (docs/theory.md section 3)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**step
    return rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)


def rectification(step: int, beta2: float) -> float | None:
    """r_t, or None while rho_t <= RHO_THRESHOLD (the step is then plain momentum SGD)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho(step, beta2)
    if rho_t <= RHO_THRESHOLD:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


class RAdam(Optimizer):
    """Rectified Adam; per-group keys ``lr``, ``betas``, ``eps``, ``weight_decay``, ``decoupled_weight_decay``.

    ``betas[0]`` may change between steps (``set_hyperparams`` does so); see the module docstring.
    Weight decay is L2 (``g += wd * theta``) or, when decoupled, ``theta *= 1 - lr * wd`` before the
    update, as in AdamW.
    """

    def __init__(self, params, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"RAdam needs lr > 0, eps > 0 and weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"RAdam betas must be in [0, 1); got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for (step, beta1_product), tensors in self._advance_state(group).items():
                _radam_update(*tensors, step=step, beta1_product=beta1_product, group=group)
        return loss

    def _advance_state(self, group: dict) -> dict[tuple[int, float], tuple[list, list, list, list]]:
        """Count this step in the state of each parameter with a gradient, and bucket the parameters by
        (step, beta1 product): one bucket unless some parameters missed gradients on earlier steps."""
        beta1 = group["betas"][0]
        buckets: dict[tuple[int, float], tuple[list, list, list, list]] = defaultdict(lambda: ([], [], [], []))
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("RAdam does not support sparse gradients")
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = 0
                state["beta1_product"] = 1.0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            state["beta1_product"] *= beta1
            bucket = buckets[(state["step"], state["beta1_product"])]
            for lst, t in zip(bucket, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                lst.append(t)
        return buckets


def _radam_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], *, step: int, beta1_product: float, group: dict) -> None:
    """One RAdam step for parameters that share ``step`` and ``beta1_product``, in foreach ops."""
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    grads = apply_weight_decay(params, grads, group=group)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m = beta1 m + (1 - beta1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

    bias_correction1 = 1.0 - beta1_product
    rect = rectification(step, beta2)
    if rect is None:
        torch._foreach_add_(params, exp_avgs, alpha=-lr / bias_correction1)
        return
    bias_correction2 = 1.0 - beta2**step
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    step_size = lr * rect * math.sqrt(bias_correction2) / bias_correction1
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)
