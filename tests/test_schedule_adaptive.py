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
