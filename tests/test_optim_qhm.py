"""QHM against docs/theory.md section 5 and its special cases (heavy ball, Nesterov, plain SGD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_train.optim import set_hyperparams
from dist_train.optim.qhm import QHM

STEPS = 30


def _gradients(steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4, 3)), rng.uniform(0.2, 2.0, size=(4, 3)), [rng.normal(size=(4, 3)) for _ in range(steps)]


def qhm_reference(*, lrs, betas, nu: float, weight_decay: float = 0.0, decoupled: bool = False) -> np.ndarray:
    """d = beta d + (1 - beta) g;  theta -= lr [(1 - nu) g + nu d], in float64."""
    theta, c, noise = _gradients(len(lrs))
    d = np.zeros_like(theta)
    for lr, beta, n in zip(lrs, betas, noise):
        g = c * theta + n
        if weight_decay and decoupled:
            theta = theta * (1 - lr * weight_decay)
        elif weight_decay:
            g = g + weight_decay * theta
        d = beta * d + (1 - beta) * g
        theta = theta - lr * ((1 - nu) * g + nu * d)
    return theta


def heavy_ball_reference(*, lr: float, beta: float) -> np.ndarray:
    """Normalised heavy ball, written in its own form: d = beta d + (1 - beta) g; theta -= lr d."""
    theta, c, noise = _gradients(STEPS)
    d = np.zeros_like(theta)
    for n in noise:
        d = beta * d + (1 - beta) * (c * theta + n)
        theta = theta - lr * d
    return theta


def nesterov_reference(*, lr: float, beta: float) -> np.ndarray:
    """Nesterov in the same normalisation: the step looks ahead along the updated buffer."""
    theta, c, noise = _gradients(STEPS)
    d = np.zeros_like(theta)
    for n in noise:
        g = c * theta + n
        d = beta * d + (1 - beta) * g
        theta = theta - lr * ((1 - beta) * g + beta * d)
    return theta


def sgd_reference(*, lr: float) -> np.ndarray:
    theta, c, noise = _gradients(STEPS)
    for n in noise:
        theta = theta - lr * (c * theta + n)
    return theta


def run(make_optimizer, *, steps: int = STEPS, hyperparams=None) -> np.ndarray:
    theta, c, noise = _gradients(steps)
    p = torch.nn.Parameter(torch.tensor(theta))
    opt = make_optimizer([p])
    for t, n in enumerate(noise, 1):
        if hyperparams is not None:
            set_hyperparams(opt, **hyperparams(t))
        p.grad = torch.tensor(c) * p.detach() + torch.tensor(n)
        opt.step()
    return p.detach().numpy()


@pytest.mark.parametrize("nu", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("weight_decay,decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_matches_theory(nu, weight_decay, decoupled):
    ours = run(lambda ps: QHM(ps, lr=0.1, momentum=0.8, nu=nu, weight_decay=weight_decay,
                              decoupled_weight_decay=decoupled))
    ref = qhm_reference(lrs=[0.1] * STEPS, betas=[0.8] * STEPS, nu=nu, weight_decay=weight_decay, decoupled=decoupled)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)


def test_nu_one_is_normalised_heavy_ball_and_torch_sgd():
    lr, beta = 0.1, 0.9
    ours = run(lambda ps: QHM(ps, lr=lr, momentum=beta, nu=1.0))
    np.testing.assert_allclose(ours, heavy_ball_reference(lr=lr, beta=beta), rtol=1e-12, atol=1e-14)
    # torch's unnormalised buffer b = beta b + g is d / (1 - beta): the same path at lr (1 - beta).
    torch_sgd = run(lambda ps: torch.optim.SGD(ps, lr=lr * (1 - beta), momentum=beta))
    np.testing.assert_allclose(ours, torch_sgd, rtol=1e-10, atol=1e-12)


def test_nu_equal_beta_is_nesterov_and_torch_nesterov_sgd():
    lr, beta = 0.1, 0.9
    ours = run(lambda ps: QHM(ps, lr=lr, momentum=beta, nu=beta))
    np.testing.assert_allclose(ours, nesterov_reference(lr=lr, beta=beta), rtol=1e-12, atol=1e-14)
    torch_sgd = run(lambda ps: torch.optim.SGD(ps, lr=lr * (1 - beta), momentum=beta, nesterov=True))
    np.testing.assert_allclose(ours, torch_sgd, rtol=1e-10, atol=1e-12)


def test_nu_zero_is_plain_sgd():
    ours = run(lambda ps: QHM(ps, lr=0.05, momentum=0.9, nu=0.0))
    np.testing.assert_allclose(ours, sgd_reference(lr=0.05), rtol=1e-12, atol=1e-14)


def test_set_hyperparams_sets_lr_and_beta_mid_run():
    def schedule(t: int) -> dict:
        return dict(lr=0.1, momentum=0.9) if t <= 10 else dict(lr=0.03, momentum=0.5 + 0.01 * t)

    ours = run(lambda ps: QHM(ps, lr=1.0, momentum=0.0, nu=0.7), hyperparams=schedule)
    lrs = [schedule(t)["lr"] for t in range(1, STEPS + 1)]
    betas = [schedule(t)["momentum"] for t in range(1, STEPS + 1)]
    np.testing.assert_allclose(ours, qhm_reference(lrs=lrs, betas=betas, nu=0.7), rtol=1e-12, atol=1e-14)
    constant = qhm_reference(lrs=[0.1] * STEPS, betas=[0.9] * STEPS, nu=0.7)
    assert not np.allclose(ours, constant, rtol=1e-3)
