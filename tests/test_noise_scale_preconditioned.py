"""The preconditioned noise scale against a problem with a closed-form answer (docs/theory.md section 2).

Linear regression, per-sample loss (w.x - y)^2 / 2, x ~ N(0, diag(s^2)), y = w*.x + n with n ~ N(0, sn^2).
At w = w* + d the per-sample gradient is r x with r = d.x + n, so with S = diag(s^2):

    G = S d,    Sigma = E[r^2 x x^T] - G G^T = (d^T S d + sn^2) S + S d d^T S     (Isserlis' theorem)

and for a fixed diagonal preconditioner P^-1 = diag(q):

    tr(P^-1 Sigma P^-1) = (d^T S d + sn^2) sum_j q_j^2 s_j^2 + sum_j q_j^2 s_j^4 d_j^2
    |P^-1 G|^2          = sum_j q_j^2 s_j^4 d_j^2

P comes from an Adam optimizer's second moments, set by hand; the probe sees micro-batches of one process.
"""

from __future__ import annotations

import pytest
import torch

from dist_train.noise_scale import (
    AccumulationNoiseScaleProbe,
    GradientNoiseScale,
    SecondMomentPreconditioner,
)
from dist_train.optim.radam import RAdam

DIM, MICRO, ACCUM, STEPS = 8, 8, 4, 3000
S = torch.linspace(0.5, 2.0, DIM, dtype=torch.float64)        # per-coordinate std of x
D = torch.linspace(1.0, -0.5, DIM, dtype=torch.float64)       # w - w*
NOISE_STD = 0.5
P = torch.logspace(-1, 1, DIM, dtype=torch.float64)           # the preconditioner's diagonal, 0.1 .. 10
EPS = 1e-8


def closed_form(q: torch.Tensor) -> float:
    s2 = S**2
    dsd = float((D**2 * s2).sum())
    trace = (dsd + NOISE_STD**2) * float((q**2 * s2).sum()) + float((q**2 * s2**2 * D**2).sum())
    return trace / float((q**2 * s2**2 * D**2).sum())


def _adam_with_second_moments(param: torch.nn.Parameter) -> torch.optim.Adam:
    """An Adam whose v_hat makes P = sqrt(v_hat) + eps equal ``P``: beta2^step underflows to 0 at step 10000."""
    opt = torch.optim.Adam([param], betas=(0.9, 0.9), eps=EPS)
    opt.state[param] = {"step": torch.tensor(10000.0), "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": ((P - EPS) ** 2).to(param.dtype).reshape(param.shape)}
    return opt


def _measured_b_simple(preconditioned: bool) -> float:
    torch.manual_seed(0)
    w_star = torch.randn(DIM)
    w = torch.nn.Parameter(w_star + D.float())
    pre = SecondMomentPreconditioner(_adam_with_second_moments(w)) if preconditioned else None
    probe = AccumulationNoiseScaleProbe([w], preconditioner=pre)
    noise = GradientNoiseScale(ema_decay=0.999)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for _ in range(ACCUM):
            x = torch.randn(MICRO, DIM, generator=gen) * S.float()
            y = x @ w_star + NOISE_STD * torch.randn(MICRO, generator=gen)
            loss = 0.5 * ((x @ w - y) ** 2).mean()
            (loss / ACCUM).backward()
            probe.after_micro_backward()
        noise.update(probe.measure(micro_batch_size=MICRO))
        w.grad = None  # w stays at w* + d: the answer is the closed form at that point
    assert noise.b_simple is not None
    return noise.b_simple


def test_the_two_answers_differ_enough_to_tell_apart():
    assert closed_form(1.0 / P) / closed_form(torch.ones(DIM, dtype=torch.float64)) > 1.3


def test_preconditioned_estimate_is_within_5_percent_of_the_closed_form():
    expected = closed_form(1.0 / P)
    measured = _measured_b_simple(preconditioned=True)
    assert measured == pytest.approx(expected, rel=0.05)
    assert measured != pytest.approx(closed_form(torch.ones(DIM, dtype=torch.float64)), rel=0.05)


def test_raw_estimate_is_within_5_percent_of_the_unpreconditioned_closed_form():
    assert _measured_b_simple(preconditioned=False) == pytest.approx(
        closed_form(torch.ones(DIM, dtype=torch.float64)), rel=0.05)


def test_radam_is_the_identity_while_its_next_step_is_unrectified():
    w = torch.nn.Parameter(torch.ones(3))
    opt = RAdam([w], lr=0.1, betas=(0.9, 0.999))
    pre = SecondMomentPreconditioner(opt)
    assert pre.inverse(w) is None  # no second moment yet
    for step in range(1, 8):
        w.grad = torch.full((3,), 0.5)
        opt.step()
        inv = pre.inverse(w)
        if step < 5:  # the next step, step + 1 <= 5, is momentum SGD (rho <= 5)
            assert inv is None, step
        else:
            v_hat = opt.state[w]["exp_avg_sq"] / (1 - 0.999**step)
            torch.testing.assert_close(inv, 1.0 / (v_hat.sqrt() + 1e-8))


def test_sgd_has_no_second_moments_to_precondition_with():
    with pytest.raises(ValueError, match="Adam-type"):
        SecondMomentPreconditioner(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))


def _ddp_measurement(rank: int, world_size: int):
    from torch.nn.parallel import DistributedDataParallel

    from dist_train.noise_scale import DDPNoiseScaleProbe

    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 1, bias=False)
    ddp = DistributedDataParallel(model)
    probe = DDPNoiseScaleProbe(ddp, preconditioner=SecondMomentPreconditioner(_adam_with_second_moments(model.weight)))
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(4 * world_size, DIM, generator=gen), torch.randn(4 * world_size, generator=gen)
    mine = slice(4 * rank, 4 * rank + 4)
    (0.5 * ((ddp(x[mine]).squeeze(1) - y[mine]) ** 2).mean()).backward()
    m = probe.measure(global_batch_size=4 * world_size, params=model.parameters())
    return float(m.small_sq_norm), float(m.big_sq_norm), model.weight.detach().clone(), x, y


def test_ddp_probe_measures_the_preconditioned_gradient_of_each_rank_and_of_the_average():
    from multiproc import run_ranks

    results = run_ranks(_ddp_measurement, world_size=2)
    _, _, w, x, y = results[0]
    q = (1.0 / P).float()

    def grad(rows: slice) -> torch.Tensor:
        return ((x[rows] @ w.squeeze(0) - y[rows])[:, None] * x[rows]).mean(0)

    local = [float(((q * grad(slice(4 * r, 4 * r + 4))) ** 2).sum()) for r in range(2)]
    big = float(((q * grad(slice(0, 8))) ** 2).sum())
    for small_sq, big_sq, *_ in results:
        assert small_sq == pytest.approx(sum(local) / 2, rel=1e-5)
        assert big_sq == pytest.approx(big, rel=1e-5)


@pytest.mark.parametrize("overrides, words", [
    (["optim.name=qhm"], ["optim.name=qhm", "radam"]),
    (["optim.name=radam", "schedule.noise_scale.enabled=false"], ["schedule.noise_scale.enabled=true"]),
    (["optim.name=radam", "backend.shard_optimizer_state=true"], ["backend.shard_optimizer_state=false"]),
    (["optim.name=radam", "backend.name=deepspeed"], ["backend.name=ddp"]),
])
def test_the_config_refuses_what_is_not_built(overrides, words):
    from dist_train.config import ConfigError, check, load_config

    base = ["schedule.noise_scale.enabled=true", "schedule.noise_scale.preconditioned=true"]
    with pytest.raises(ConfigError) as err:
        check(load_config("configs/demo.yaml", base + overrides))
    assert all(w in str(err.value) for w in words), str(err.value)
    check(load_config("configs/demo.yaml", base + ["optim.name=radam"]))  # what is built passes


def test_the_trainer_measures_it_through_lookahead_and_radam_rectification():
    from harness import global_batches, make_trainer

    from dist_train.optim.config import LookaheadConfig, OptimConfig

    optim = OptimConfig(name="radam", lr=0.01, lookahead=LookaheadConfig(k=2, alpha=0.5))
    values = {}
    for preconditioned in (False, True):
        trainer = make_trainer(0, 1, batches=global_batches(8, 32), micro=8, optim=optim,
                               noise=GradientNoiseScale(ema_decay=0.0))  # ema 0: each step's own estimate
        trainer.backend.enable_noise_scale(preconditioned=preconditioned)
        values[preconditioned] = []
        for _ in range(8):
            trainer.train_step(trainer._schedule_state())
            values[preconditioned].append(trainer.noise.grad_sq_norm)
    # The gradients of steps 1-5 are not preconditioned (no state, then RAdam's first five steps are momentum
    # SGD): the same numbers. Step 6 is rectified, so P^-1 weighs its gradient and the estimates part.
    assert values[True][:5] == values[False][:5]
    assert all(abs(a / b - 1) > 1e-3 for a, b in zip(values[True][5:], values[False][5:]))
