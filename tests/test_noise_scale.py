"""The measured gradient noise scale (McCandlish et al.; docs/theory.md section 2).

The synthetic problem is linear regression y = x.w* + n with x ~ N(0, I_d), n ~ N(0, s^2), per-example
loss (x.w - y)^2 / 2, evaluated at a fixed w = w* + delta. The per-example gradient is x (x.delta - n), so
G = delta and, by Isserlis' theorem, E[g g^T] = (|delta|^2 + s^2) I + 2 delta delta^T, hence
Sigma = (|delta|^2 + s^2) I + delta delta^T and tr(Sigma) = d (|delta|^2 + s^2) + |delta|^2.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from multiproc import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train.noise_scale import (
    AccumulationNoiseScaleProbe,
    DDPNoiseScaleProbe,
    GradientNoiseScale,
    NoiseMeasurement,
    unbiased_estimates,
)

DIM, NOISE_STD = 10, 1.0
TRUE_GRAD_SQ_NORM = 1.0  # |delta|^2
TRUE_TRACE_COV = DIM * (TRUE_GRAD_SQ_NORM + NOISE_STD**2) + TRUE_GRAD_SQ_NORM  # 21
STEPS, EMA_DECAY = 600, 0.99


def regression_model() -> tuple[nn.Linear, torch.Tensor]:
    """A linear model at w* + delta with |delta| = 1, the same on every rank; returns it and w*."""
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(DIM, generator=gen)
    delta = torch.randn(DIM, generator=gen)
    model = nn.Linear(DIM, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star + delta / delta.norm())
    return model, w_star


def regression_loss(model: nn.Module, w_star: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(batch_size, DIM, generator=gen)
    y = x @ w_star + NOISE_STD * torch.randn(batch_size, generator=gen)
    return 0.5 * (model(x).squeeze(1) - y).square().mean()


def assert_close_to_truth(est: GradientNoiseScale) -> None:
    assert est.grad_sq_norm == pytest.approx(TRUE_GRAD_SQ_NORM, rel=0.1)
    assert est.trace_cov == pytest.approx(TRUE_TRACE_COV, rel=0.1)
    assert est.b_simple == pytest.approx(TRUE_TRACE_COV / TRUE_GRAD_SQ_NORM, rel=0.1)


# --- the estimator ----------------------------------------------------------------------------------------------
def exact_measurement(g2: float, trace: float, b_small: int, b_big: int) -> NoiseMeasurement:
    """Squared norms equal to their expectations |G|^2 + tr(Sigma) / B."""
    return NoiseMeasurement(small_sq_norm=g2 + trace / b_small, small_batch_size=b_small,
                            big_sq_norm=g2 + trace / b_big, big_batch_size=b_big)


def test_two_batch_sizes_give_back_grad_norm_and_trace():
    g2, trace = unbiased_estimates(exact_measurement(2.0, 30.0, 10, 40))
    assert (g2, trace) == (pytest.approx(2.0), pytest.approx(30.0))
    with pytest.raises(ValueError, match="two different batch sizes"):
        NoiseMeasurement(small_sq_norm=1.0, small_batch_size=32, big_sq_norm=1.0, big_batch_size=32)


def test_ema_is_bias_corrected_and_skips_non_finite_steps():
    est = GradientNoiseScale(ema_decay=0.5)
    assert (est.grad_sq_norm, est.b_simple, est.metrics()) == (None, None, {})
    est.update(exact_measurement(2.0, 30.0, 10, 40))
    assert (est.grad_sq_norm, est.trace_cov, est.b_simple) == pytest.approx((2.0, 30.0, 15.0))
    est.update(exact_measurement(4.0, 60.0, 10, 40))
    # weights 0.25 and 0.5 of a total 0.75
    assert (est.grad_sq_norm, est.trace_cov) == pytest.approx(((0.5 * 2 + 4) / 1.5, (0.5 * 30 + 60) / 1.5))
    before = est.state_dict()
    est.update(NoiseMeasurement(small_sq_norm=float("nan"), small_batch_size=10, big_sq_norm=1.0,
                                big_batch_size=40))
    est.update(NoiseMeasurement(small_sq_norm=torch.tensor(float("inf")), small_batch_size=10,
                                big_sq_norm=torch.tensor(1.0), big_batch_size=40))
    assert est.state_dict() == before
    assert est.metrics() == pytest.approx({"noise_scale/grad_sq_norm": 10 / 3, "noise_scale/trace_cov": 50.0,
                                           "noise_scale/b_simple": 15.0})


def test_b_simple_is_undefined_while_grad_norm_estimate_is_not_positive():
    est = GradientNoiseScale(ema_decay=0.9)
    est.update(exact_measurement(-1.0, 30.0, 10, 40))  # one step's |G|^2 estimate can come out negative
    assert est.grad_sq_norm == pytest.approx(-1.0) and est.b_simple is None
    assert "noise_scale/b_simple" not in est.metrics()


def test_state_dict_round_trip_continues_identically():
    steps = [exact_measurement(1.0 + i, 20.0 - i, 8, 32) for i in range(6)]
    full = GradientNoiseScale(ema_decay=0.8)
    for m in steps:
        full.update(m)
    first = GradientNoiseScale(ema_decay=0.8)
    for m in steps[:3]:
        first.update(m)
    resumed = GradientNoiseScale(ema_decay=0.8)
    resumed.load_state_dict(first.state_dict())
    for m in steps[3:]:
        resumed.update(m)
    assert resumed.state_dict() == full.state_dict()
    with pytest.raises(KeyError, match="expected"):
        resumed.load_state_dict({"weight": 1.0})


# --- one process, gradient accumulation -----------------------------------------------------------------------
def test_accumulation_probe_recovers_the_true_noise_scale():
    torch.manual_seed(0)
    model, w_star = regression_model()
    gen = torch.Generator().manual_seed(1)
    probe = AccumulationNoiseScaleProbe(model.parameters())
    est = GradientNoiseScale(ema_decay=EMA_DECAY)
    micro, accum = 8, 4
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        for _ in range(accum):
            (regression_loss(model, w_star, micro, gen) / accum).backward()
            probe.after_micro_backward()
        m = probe.measure(micro_batch_size=micro)
        assert (m.small_batch_size, m.big_batch_size) == (8, 32)
        est.update(m)
    assert_close_to_truth(est)


def test_accumulation_probe_norms_are_exact():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    xs = torch.randn(3, 4, 5)
    reference = copy.deepcopy(mlp)
    micro_grads = [torch.cat([g.flatten() for g in torch.autograd.grad(reference(x).square().mean(),
                                                                       list(reference.parameters()))]) for x in xs]
    probe = AccumulationNoiseScaleProbe(mlp.parameters())
    for x in xs:
        (mlp(x).square().mean() / 3).backward()
        probe.after_micro_backward()
    m = probe.measure(micro_batch_size=4)
    assert (m.small_batch_size, m.big_batch_size) == (4, 12)
    expected_small = torch.stack([g.square().sum() for g in micro_grads]).mean()
    expected_big = torch.stack(micro_grads).mean(0).square().sum()
    assert float(m.small_sq_norm) == pytest.approx(float(expected_small), rel=1e-5)
    assert float(m.big_sq_norm) == pytest.approx(float(expected_big), rel=1e-5)
    with pytest.raises(RuntimeError, match="needs >= 2"):
        probe.measure(micro_batch_size=4)
    mlp(xs[0]).sum().backward()
    with pytest.raises(RuntimeError, match="unmarked backward"):
        probe.measure(micro_batch_size=4)
    # Unclosed backwards (steps without accumulation) are dropped, not piled up into the next micro-step.
    for _ in range(3):
        mlp(xs[1]).sum().backward()
    assert len(probe._pending) == len(probe.params)
    mlp.zero_grad(set_to_none=True)
    for x in xs:
        (mlp(x).square().mean() / 3).backward()
        probe.after_micro_backward()
    again = probe.measure(micro_batch_size=4)
    assert float(again.small_sq_norm) == pytest.approx(float(expected_small), rel=1e-5)
    probe.remove()


# --- DDP, two gloo ranks -------------------------------------------------------------------------------------
def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _ddp_norms_against_reference(rank: int, world_size: int) -> float:
    """Largest relative error of the probe's norms against a plain replica's gradients, and of DDP's result."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(100 + rank)
    errors = []
    for as_view in (False, True):
        reference = copy.deepcopy(mlp)
        ddp = DistributedDataParallel(copy.deepcopy(mlp), gradient_as_bucket_view=as_view, bucket_cap_mb=1e-4)
        probe = DDPNoiseScaleProbe(ddp)
        for _ in range(3):
            ddp.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            for micro_step in range(2):  # accumulate locally, sync on the last micro-step
                x = torch.randn(4, 6, generator=gen)
                with ddp.no_sync() if micro_step == 0 else contextlib.nullcontext():
                    (ddp(x).square().mean() / 2).backward()
                (reference(x).square().mean() / 2).backward()
            m = probe.measure(global_batch_size=16)
            local = _flat_grads(reference)
            mean_local_sq = local.square().sum() / world_size
            dist.all_reduce(mean_local_sq)
            mean_grad = local / world_size
            dist.all_reduce(mean_grad)
            assert (m.small_batch_size, m.big_batch_size) == (8, 16)
            errors += [abs(float(m.small_sq_norm) / float(mean_local_sq) - 1),
                       abs(float(m.big_sq_norm) / float(mean_grad.square().sum()) - 1),
                       float((_flat_grads(ddp.module) - mean_grad).abs().max())]
    x = torch.randn(4, 6, generator=gen)
    for _ in range(2):  # two synchronising backwards and no measure() in between
        ddp(x).sum().backward()
    try:
        probe.measure(global_batch_size=16)
        errors.append(float("inf"))
    except RuntimeError as err:
        assert "2 synchronising backward(s)" in str(err)
    return max(errors)


def _ddp_regression(rank: int, world_size: int) -> dict[str, float]:
    model, w_star = regression_model()
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
    probe = DDPNoiseScaleProbe(ddp)
    est = GradientNoiseScale(ema_decay=EMA_DECAY)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own samples
    micro, accum = 8, 2
    for _ in range(STEPS):
        ddp.zero_grad(set_to_none=True)
        for micro_step in range(accum):
            with ddp.no_sync() if micro_step < accum - 1 else contextlib.nullcontext():
                (regression_loss(ddp, w_star, micro, gen) / accum).backward()
        est.update(probe.measure(global_batch_size=micro * accum * world_size))
    return {"state": est.state_dict(), "reference_error": _ddp_norms_against_reference(rank, world_size)}


def test_ddp_probe_on_two_ranks_matches_reference_and_recovers_the_noise_scale():
    outs = run_ranks(_ddp_regression, world_size=2)
    assert outs[0]["state"] == outs[1]["state"]  # every rank holds the same estimate
    for out in outs:
        assert out["reference_error"] < 1e-5
    est = GradientNoiseScale(ema_decay=EMA_DECAY)
    est.load_state_dict(outs[0]["state"])
    assert_close_to_truth(est)
    assert math.isfinite(est.b_simple)


@settings(max_examples=200, deadline=None)
@given(g2=st.floats(-1e3, 1e3), trace=st.floats(0, 1e6), weight=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
       threshold=st.floats(0, 1e4))
def test_the_device_side_growth_test_answers_as_the_host_would(g2, trace, weight, threshold):
    # The trainer compares B_simple with the threshold on the device and reads the answer with the step's
    # flags; it must be the host's answer, boundary cases (undefined B_simple, |G|^2 <= 0) included.
    noise = GradientNoiseScale()
    noise._state = torch.tensor([g2 * weight, trace * weight, weight], dtype=torch.float64)
    host = noise.b_simple is not None and noise.b_simple > threshold
    assert bool(noise.b_simple_exceeds(threshold)) == host
