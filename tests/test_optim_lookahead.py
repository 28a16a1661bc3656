"""Lookahead against docs/theory.md section 4, state round trips inside the k-cycle, and slow-weight evaluation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from dist_train.optim import LookaheadConfig, OptimConfig, build_optimizer, set_hyperparams, slow_weights
from dist_train.optim.lookahead import Lookahead
from dist_train.optim.radam import RAdam


def _problem(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(5, 2)), rng.uniform(0.2, 2.0, size=(5, 2)), [rng.normal(size=(5, 2)) for _ in range(steps)]


def lookahead_reference(steps: int, *, k: int, alpha: float, lr: float, momentum: float):
    """docs/theory.md section 4 around torch-style momentum SGD (b = m b + g; theta -= lr b), whose buffer is kept
    across syncs. Returns the fast and the slow weights after ``steps`` steps."""
    theta, c, noise = _problem(steps)
    phi, b = theta.copy(), np.zeros_like(theta)
    for t, n in enumerate(noise, 1):
        g = c * theta + n
        b = momentum * b + g if t > 1 else g
        theta = theta - lr * b
        if t % k == 0:
            phi = phi + alpha * (theta - phi)
            theta = phi.copy()
    return theta, phi


def run(optimizer_factory, steps: int):
    theta, c, noise = _problem(steps)
    p = torch.nn.Parameter(torch.tensor(theta))
    opt = optimizer_factory([p])
    for n in noise:
        p.grad = torch.tensor(c) * p.detach() + torch.tensor(n)
        opt.step()
    return p, opt


@pytest.mark.parametrize("k,alpha,steps", [(5, 0.5, 23), (3, 0.2, 12), (1, 1.0, 7), (4, 0.8, 3)])
def test_k_and_alpha_follow_theory(k, alpha, steps):
    p, opt = run(lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.1, momentum=0.7), k=k, alpha=alpha), steps)
    fast, slow = lookahead_reference(steps, k=k, alpha=alpha, lr=0.1, momentum=0.7)
    np.testing.assert_allclose(p.detach().numpy(), fast, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state[p]["lookahead_slow"].numpy(), slow, rtol=1e-12, atol=1e-14)
    with slow_weights(opt):
        np.testing.assert_allclose(p.detach().numpy(), slow, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p.detach().numpy(), fast, rtol=1e-12, atol=1e-14)


def test_k_one_alpha_one_is_the_inner_optimizer():
    p, _ = run(lambda ps: Lookahead(RAdam(ps, lr=0.05), k=1, alpha=1.0), 15)
    q, _ = run(lambda ps: RAdam(ps, lr=0.05), 15)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _train(model, opt, steps: int, *, first_step: int = 0) -> list[float]:
    losses = []
    for step in range(first_step, first_step + steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["radam", "adamw", "sgd", "qhm"])
@pytest.mark.parametrize("stop_at", [3, 7])
def test_state_dict_round_trip_inside_the_k_cycle_continues_bitwise(name, stop_at):
    cfg = OptimConfig(name=name, lr=0.01, decoupled_weight_decay=name in ("adamw", "radam"),
                      lookahead=LookaheadConfig(k=5, alpha=0.5))
    model = _model()
    opt = build_optimizer(model, cfg)
    _train(model, opt, stop_at)
    checkpoint = _roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    expected = _train(model, opt, 9, first_step=stop_at)

    resumed_model = _model()
    resumed_opt = build_optimizer(resumed_model, cfg)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optim"])
    assert resumed_opt.param_groups[0]["lookahead_step"] == stop_at
    assert _train(resumed_model, resumed_opt, 9, first_step=stop_at) == expected
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    with slow_weights(opt), slow_weights(resumed_opt):
        for a, b in zip(model.parameters(), resumed_model.parameters()):
            assert torch.equal(a, b)


def test_set_hyperparams_reaches_the_inner_optimizer():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="radam", lr=0.01, lookahead=LookaheadConfig()))
    set_hyperparams(opt, lr=0.003, momentum=0.8)
    assert all(g["lr"] == 0.003 and g["betas"][0] == 0.8 for g in opt.inner.param_groups)
    _train(model, opt, 2)
    opt.load_state_dict(_roundtrip(opt.state_dict()))
    set_hyperparams(opt, lr=0.004, momentum=0.7)  # still shared after a load
    assert all(g["lr"] == 0.004 and g["betas"][0] == 0.7 for g in opt.inner.param_groups)


def test_parameter_first_seen_late_starts_its_slow_weights_then():
    """torch's optimizers initialise state only when they find it empty: the slow weights must not get there first."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Lookahead(torch.optim.AdamW([a, b], lr=0.1, foreach=True), k=2, alpha=0.5)
    for t in range(5):
        a.grad = torch.ones(3)
        b.grad = torch.ones(3) if t >= 1 else None
        opt.step()
    assert "lookahead_slow" in opt.state[b] and opt.state[b]["step"].item() == 4


def test_loading_a_state_without_lookahead_is_an_error():
    model = _model()
    plain = build_optimizer(model, OptimConfig(name="radam"))
    wrapped = build_optimizer(model, OptimConfig(name="radam", lookahead=LookaheadConfig()))
    with pytest.raises(ValueError, match="without Lookahead"):
        wrapped.load_state_dict(plain.state_dict())


def test_slow_weights_is_a_no_op_without_lookahead():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="radam"))
    _train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with slow_weights(opt):
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
