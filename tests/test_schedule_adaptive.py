"""The adaptive batch-size controller: grows when B_simple > margin x B, every K steps at most, up to the cap."""

from __future__ import annotations

import pytest

from dist_train.schedule import AdaptiveConfig, BatchSizeController


def controller(**cfg_kwargs) -> BatchSizeController:
    cfg = AdaptiveConfig(**{"growth_factor": 2.0, "margin": 1.0, "min_steps_between_growths": 10, **cfg_kwargs})
    return BatchSizeController(cfg, start_global_batch_size=8, max_global_batch_size=64, batch_granularity=4)


def batches(ctl: BatchSizeController, b_simple: list[float | None], first_step: int = 1) -> list[int]:
    """The batch after each step's update."""
    out = []
    for step, b in enumerate(b_simple, start=first_step):
        ctl.update(step=step, b_simple=b)
        out.append(ctl.global_batch_size)
    return out


def test_grows_every_k_steps_up_to_the_cap():
    # Steps 1-9 wait for the averages; growths at 10, 20, 30 (8 -> 16 -> 32 -> 64); 64 is the cap.
    assert batches(controller(), [100.0] * 45) == [8] * 9 + [16] * 10 + [32] * 10 + [64] * 16


def test_grows_only_above_margin_times_batch():
    ctl = controller(margin=2.0)
    assert not ctl.update(step=10, b_simple=16.0)  # 16 is not > 2 x 8
    assert ctl.update(step=11, b_simple=16.5) and ctl.global_batch_size == 16
    assert not ctl.update(step=30, b_simple=32.0)  # needs > 32 now
    for bad in (None, float("nan"), float("inf")):
        assert not ctl.update(step=100, b_simple=bad)
    assert ctl.global_batch_size == 16


def test_a_growth_resets_the_spacing():
    ctl = controller()
    assert batches(ctl, [1.0] * 14 + [100.0] * 12) == [8] * 14 + [16] * 10 + [32] * 2  # growths at 15 and 25


def test_growth_is_rounded_to_the_granularity_and_clipped_to_the_cap():
    cfg = AdaptiveConfig(growth_factor=1.1, min_steps_between_growths=1)
    ctl = BatchSizeController(cfg, start_global_batch_size=8, max_global_batch_size=20, batch_granularity=4)
    # 8 x 1.1 rounds back to 8, so at least one granule is added; 16 x 1.1 = 17.6 -> 16 -> 20; the cap stops it.
    assert batches(ctl, [1e6] * 5) == [12, 16, 20, 20, 20]
    big = BatchSizeController(AdaptiveConfig(growth_factor=8.0, min_steps_between_growths=1),
                              start_global_batch_size=8, max_global_batch_size=20, batch_granularity=4)
    assert batches(big, [1e6] * 2) == [20, 20]


def test_state_dict_round_trip_resumes_the_same_decisions():
    signal = [100.0 if s % 7 else 3.0 for s in range(60)]
    full = batches(controller(), signal)
    first = controller()
    head = batches(first, signal[:23])
    resumed = controller()
    resumed.load_state_dict(first.state_dict())
    assert head + batches(resumed, signal[23:], first_step=24) == full
    assert resumed.state_dict() == controller_after(signal).state_dict()
    with pytest.raises(KeyError, match="expected"):
        resumed.load_state_dict({"global_batch_size": 8})
    with pytest.raises(ValueError, match="not a multiple of 4"):
        resumed.load_state_dict({"global_batch_size": 10, "last_growth_step": 0})


def controller_after(signal: list[float]) -> BatchSizeController:
    ctl = controller()
    batches(ctl, signal)
    return ctl


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="multiples of batch_granularity=4"):
        BatchSizeController(AdaptiveConfig(), start_global_batch_size=6, max_global_batch_size=64, batch_granularity=4)
    with pytest.raises(ValueError, match="<= max_global_batch_size"):
        BatchSizeController(AdaptiveConfig(), start_global_batch_size=128, max_global_batch_size=64,
                            batch_granularity=4)


def test_adaptive_loop_grows_the_batch_up_to_the_measured_noise_scale():
    """Linear regression with B_simple = 21 (see test_noise_scale): from 8 the batch grows to 16 and 32, then stops."""
    import torch
    from test_noise_scale import regression_loss, regression_model

    from dist_train.config import from_dict
    from dist_train.noise_scale import AccumulationNoiseScaleProbe, GradientNoiseScale
    from dist_train.schedule import Schedule, ScheduleConfig

    cfg = from_dict(ScheduleConfig, {"mode": "adaptive", "max_global_batch_size": 64,
                                     "noise_scale": {"enabled": True, "ema_decay": 0.98},
                                     "adaptive": {"min_steps_between_growths": 150, "lr_scaling": "linear"}})
    micro = 4
    sched = Schedule(cfg, base_lr=0.1, base_momentum=0.0, base_global_batch_size=8, dataset_size=10_000,
                     optimizer_family="sgd", batch_granularity=micro)
    ctl = BatchSizeController(cfg.adaptive, start_global_batch_size=sched.start_global_batch_size,
                              max_global_batch_size=cfg.max_global_batch_size, batch_granularity=micro)
    model, w_star = regression_model()  # held fixed: B_simple stays 21
    probe = AccumulationNoiseScaleProbe(model.parameters())
    noise = GradientNoiseScale(ema_decay=cfg.noise_scale.ema_decay)
    gen = torch.Generator().manual_seed(0)
    samples_seen, history = 0, []
    for step in range(1, 601):
        state = sched.state_at(samples_seen, global_batch_size=ctl.global_batch_size)
        accum = state.global_batch_size // micro
        model.zero_grad(set_to_none=True)
        for _ in range(accum):
            (regression_loss(model, w_star, micro, gen) / accum).backward()
            probe.after_micro_backward()
        noise.update(probe.measure(micro_batch_size=micro))
        samples_seen += state.global_batch_size
        if ctl.update(step=step, b_simple=noise.b_simple):
            history.append((step, ctl.global_batch_size))
    assert history == [(150, 16), (300, 32)]
    assert sched.state_at(samples_seen, global_batch_size=32).lr == pytest.approx(0.4)  # linear: 0.1 x 32 / 8
