"""RAdam against docs/theory.md section 3, written out in float64 numpy, and against torch.optim.RAdam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_train.optim import set_hyperparams
from dist_train.optim.radam import RAdam, rectification, rho

SHAPES = [(6, 5), (5,), (3, 2, 2)]


def _problem(steps: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
    """A noisy quadratic: g = c * (theta - target) + noise_t, per tensor."""
    rng = np.random.default_rng(seed)
    starts = [rng.normal(size=s) for s in SHAPES]
    curvatures = [rng.uniform(0.1, 3.0, size=s) for s in SHAPES]
    noise = [[rng.normal(scale=0.3, size=s) for s in SHAPES] for _ in range(steps)]
    return starts, curvatures, noise


def _grad(theta: np.ndarray, c: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return c * (theta - 1.0) + noise


def radam_reference(steps: int, *, lrs: list[float], beta1s: list[float], beta2: float, eps: float,
                    weight_decay: float, decoupled: bool, threshold: float = 5.0) -> list[np.ndarray]:
    """docs/theory.md section 3 one line at a time; m_hat divides by 1 - prod(beta1_i) (= 1 - beta1^t when constant)."""
    starts, curvatures, noise = _problem(steps)
    out = []
    rho_inf = 2 / (1 - beta2) - 1
    for k, theta in enumerate(starts):
        theta = theta.copy()
        m = np.zeros_like(theta)
        v = np.zeros_like(theta)
        beta1_product = 1.0
        for t in range(1, steps + 1):
            lr, beta1 = lrs[t - 1], beta1s[t - 1]
            g = _grad(theta, curvatures[k], noise[t - 1][k])
            if weight_decay and decoupled:
                theta = theta * (1 - lr * weight_decay)
            elif weight_decay:
                g = g + weight_decay * theta
            m = beta1 * m + (1 - beta1) * g
            beta1_product *= beta1
            m_hat = m / (1 - beta1_product)
            v = beta2 * v + (1 - beta2) * g * g
            rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
            if rho_t > threshold:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                theta = theta - lr * r * m_hat * math.sqrt(1 - beta2**t) / (np.sqrt(v) + eps)
            else:
                theta = theta - lr * m_hat
        out.append(theta)
    return out


def run_torch(make_optimizer, steps: int, *, dtype=torch.float64, hyperparams=None) -> list[torch.Tensor]:
    """Run an optimizer on the same problem; ``hyperparams(t)`` -> (lr, momentum) is applied before step t."""
    starts, curvatures, noise = _problem(steps)
    params = [torch.nn.Parameter(torch.tensor(s, dtype=dtype)) for s in starts]
    opt = make_optimizer(params)
    for t in range(1, steps + 1):
        if hyperparams is not None:
            lr, momentum = hyperparams(t)
            set_hyperparams(opt, lr=lr, momentum=momentum)
        for p, c, n in zip(params, curvatures, noise[t - 1]):
            p.grad = torch.tensor(_grad(p.detach().double().numpy(), c, n), dtype=dtype)
        opt.step()
    return [p.detach().double() for p in params]


def assert_close(ours: list[torch.Tensor], ref: list[np.ndarray], *, rtol: float, atol: float) -> None:
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.numpy(), b, rtol=rtol, atol=atol)


WD_MODES = [(0.0, False), (0.1, False), (0.1, True)]


@pytest.mark.parametrize("weight_decay,decoupled", WD_MODES, ids=["no_wd", "l2", "decoupled"])
def test_matches_theory_across_the_rho_switch(weight_decay, decoupled):
    steps, lr, beta1, beta2 = 60, 0.05, 0.9, 0.99
    assert rectification(5, beta2) is None and rectification(6, beta2) is not None  # the switch is inside the run
    ours = run_torch(lambda ps: RAdam(ps, lr=lr, betas=(beta1, beta2), eps=1e-8, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled), steps)
    ref = radam_reference(steps, lrs=[lr] * steps, beta1s=[beta1] * steps, beta2=beta2, eps=1e-8,
                          weight_decay=weight_decay, decoupled=decoupled)
    assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_threshold_is_rho_above_five():
    """rho_5 is just below 5 for any beta2: step 5 is plain momentum SGD here; a threshold of 4 would rectify it."""
    beta2 = 0.999
    assert 4 < rho(5, beta2) <= 5 < rho(6, beta2)
    kwargs = dict(lrs=[0.1] * 5, beta1s=[0.9] * 5, beta2=beta2, eps=1e-8, weight_decay=0.0, decoupled=False)
    ours = run_torch(lambda ps: RAdam(ps, lr=0.1, betas=(0.9, beta2)), 5)
    assert_close(ours, radam_reference(5, threshold=5.0, **kwargs), rtol=1e-12, atol=1e-14)
    at_four = radam_reference(5, threshold=4.0, **kwargs)
    assert not np.allclose(ours[0].numpy(), at_four[0], rtol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay,decoupled", WD_MODES, ids=["no_wd", "l2", "decoupled"])
def test_matches_torch_radam_with_constant_beta1(foreach, weight_decay, decoupled):
    steps, lr, betas = 60, 0.03, (0.9, 0.995)
    kwargs = dict(lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    for dtype, rtol in [(torch.float64, 1e-10), (torch.float32, 2e-5)]:
        ours = run_torch(lambda ps: RAdam(ps, **kwargs), steps, dtype=dtype)
        theirs = run_torch(lambda ps: torch.optim.RAdam(ps, foreach=foreach, **kwargs), steps, dtype=dtype)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


def _schedule(t: int) -> tuple[float, float]:
    """lr and beta1 change mid-run, the way the schedule changes them."""
    if t <= 20:
        return 0.05, 0.9
    if t <= 40:
        return 0.01, 0.95
    return 0.02, 0.8 + 0.001 * t


def test_set_hyperparams_mid_run_follows_theory_with_product_bias_correction():
    steps, beta2 = 60, 0.99
    lrs, beta1s = zip(*(_schedule(t) for t in range(1, steps + 1)))
    ours = run_torch(lambda ps: RAdam(ps, lr=1.0, betas=(0.5, beta2), weight_decay=0.01), steps, hyperparams=_schedule)
    ref = radam_reference(steps, lrs=list(lrs), beta1s=list(beta1s), beta2=beta2, eps=1e-8, weight_decay=0.01,
                          decoupled=False)
    assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    unchanged = radam_reference(steps, lrs=[0.05] * steps, beta1s=[0.9] * steps, beta2=beta2, eps=1e-8,
                                weight_decay=0.01, decoupled=False)
    assert not np.allclose(ours[0].numpy(), unchanged[0], rtol=1e-4)


def test_parameters_without_gradients_are_skipped_and_keep_their_own_step():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = RAdam([a, b], lr=0.1)
    for t in range(4):
        a.grad = torch.ones(3)
        b.grad = torch.ones(3) if t >= 2 else None
        opt.step()
    assert opt.state[a]["step"] == 4 and opt.state[b]["step"] == 2
    ref = RAdam([c := torch.nn.Parameter(torch.ones(3))], lr=0.1)
    for _ in range(2):
        c.grad = torch.ones(3)
        ref.step()
    torch.testing.assert_close(b.detach(), c.detach(), rtol=0, atol=0)


def test_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError):
        RAdam(p, lr=-1.0)
    with pytest.raises(ValueError):
        RAdam(p, betas=(1.0, 0.999))
