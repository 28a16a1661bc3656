"""The cosine schedule and its batch-growth twin, against formulas written out here (docs/schedule.md, cosine).

The twin grows B by the inverse of the cosine's lr factor, so its noise scale g = lr N / (B (1 - m)) should
follow the cosine run's g as a function of samples seen, while it takes fewer steps. Every expectation below
is computed from the formulas, not from the schedule under test.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest

from dist_train.config import ConfigError, check, from_dict, load_config
from dist_train.schedule import Schedule, ScheduleConfig

N = 50_000
EPOCHS = 40.0
LR, MOMENTUM, B0, CAP = 0.1, 0.9, 256, 16_384  # the cap is 64 x B0, and a multiple of both granularities


def cosine_factor(epoch: float, *, warmup: float, total: float, final: float) -> float:
    """The cosine's lr factor, as written in docs/schedule.md: 1 in the warmup, then half a cosine to ``final``."""
    progress = min(max((epoch - warmup) / (total - warmup), 0.0), 1.0)
    return final + (1 - final) * (1 + math.cos(math.pi * progress)) / 2


def warmup_factor(epoch: float, *, warmup: float, start: float) -> float:
    return 1.0 if epoch >= warmup else start + (1 - start) * epoch / warmup


def noise_scale(lr: float, batch: int, momentum: float) -> float:
    return lr * N / (batch * (1 - momentum))


def make(mode: str, *, granularity: int = 8, base_momentum: float = MOMENTUM, base_global_batch_size: int = B0,
         **cfg_kwargs) -> Schedule:
    if mode == "increase_batch_cosine":
        cfg_kwargs.setdefault("max_global_batch_size", CAP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the twin's rounding warning; test_the_twin_warns_... checks it
        return Schedule(ScheduleConfig(mode=mode, **cfg_kwargs), base_lr=LR, base_momentum=base_momentum,
                        base_global_batch_size=base_global_batch_size, dataset_size=N, optimizer_family="sgd",
                        batch_granularity=granularity, total_epochs=EPOCHS)


def walk(sched: Schedule):
    """(samples seen, state) of every step of a run of ``EPOCHS`` epochs, as the trainer takes them."""
    samples = 0
    while samples < EPOCHS * N:
        state = sched.state_at(samples)
        yield samples, state
        samples += state.global_batch_size


def test_cosine_lr_follows_the_formula_after_warmup_and_the_batch_stays():
    # lr0 = 0.1 x 256/128 = 0.2 (linear scaling); 2 warmup epochs from 0.25 x lr0; down to 0.1 x lr0 at epoch 40.
    kw = dict(warmup_epochs=2.0, warmup_start_factor=0.25, cosine_final_lr_factor=0.1, lr_scaling="linear",
              reference_global_batch_size=128)
    sched = make("cosine", **kw)
    lr0 = 0.2
    expected = {
        0.0: 0.25 * lr0, 1.0: 0.625 * lr0,  # the warmup ramp
        2.0: lr0,  # the cosine starts at the top
        11.5: lr0 * (0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2),  # a quarter of the way: cos(pi/4)
        21.0: lr0 * (0.1 + 0.9 / 2),  # half way
        40.0: 0.1 * lr0, 55.0: 0.1 * lr0,  # the end, and after it (a run that overshoots by a step)
    }
    for epoch, lr in expected.items():
        state = sched.state_at(round(epoch * N))
        assert state.lr == pytest.approx(lr, rel=1e-9), epoch
        assert (state.global_batch_size, state.momentum, state.milestones_passed) == (B0, MOMENTUM, 0)
    # And everywhere in between, against the function written out above.
    for epoch in (0.3, 3.7, 17.0, 33.3, 39.99):
        want = lr0 * warmup_factor(epoch, warmup=2.0, start=0.25) * cosine_factor(epoch, warmup=2.0, total=EPOCHS,
                                                                                  final=0.1)
        assert sched.state_at(round(epoch * N)).lr == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("granularity", [8, 256])  # e.g. micro 8 x 1 rank, and micro 32 x 8 ranks
def test_the_twin_follows_the_cosine_noise_scale_against_samples_seen(granularity):
    """g_twin(samples) = g_cosine(samples) up to the rounding of B.

    The twin wants B = B0 / c (c the cosine's lr factor) and trains with the nearest multiple of the
    granularity G, which is at most G/2 away: B - G/2 <= B0 / c <= B + G/2. Its g = lr0 N / (B (1 - m)) and the
    cosine's g = lr0 c N / (B0 (1 - m)) = lr0 N / ((B0 / c)(1 - m)) therefore differ by the factor (B0 / c) / B,
    within 1 +- G / (2B). (The cap is a multiple of G, so at the cap the two agree exactly.)
    """
    cosine, twin = make("cosine", warmup_epochs=1.0), make("increase_batch_cosine", warmup_epochs=1.0,
                                                           granularity=granularity)
    batches, worst = set(), 0.0
    for samples, state in walk(twin):
        g_cosine = cosine.state_at(samples).noise_scale
        epoch = samples / N
        want = noise_scale(LR * warmup_factor(epoch, warmup=1.0, start=0.0)
                           * cosine_factor(epoch, warmup=1.0, total=EPOCHS, final=0.0), B0, MOMENTUM)
        assert g_cosine == pytest.approx(want, rel=1e-9, abs=1e-12)  # the reference itself is the formula
        batch = state.global_batch_size
        assert batch % granularity == 0 and B0 <= batch <= CAP
        error = abs(state.noise_scale / g_cosine - 1) if g_cosine else 0.0
        assert error <= granularity / (2 * batch) + 1e-12, (epoch, batch)
        worst = max(worst, error)
        batches.add(batch)
    # The batch really moved, up to the cap, and the rounding really happened (the bound was put to work).
    assert min(batches) == B0 and max(batches) == CAP and len(batches) > 20
    assert worst > 0.0


def mean_cosine_factor_with_floor(*, floor: float, final: float) -> float:
    """The integral over progress 0..1 of max(c(p), floor), c(p) = final + (1 - final)(1 + cos(pi p)) / 2.

    The twin takes 1/B = max(c, B0/cap) / B0 steps per sample: c while it grows the batch, B0/cap once at the
    cap. Where c falls below the floor: c(p*) = floor, so cos(pi p*) = 2 (floor - final) / (1 - final) - 1.
    """
    if floor <= final:
        return (1 + final) / 2
    p_star = math.acos(2 * (floor - final) / (1 - final) - 1) / math.pi
    above = final * p_star + (1 - final) * (p_star / 2 + math.sin(math.pi * p_star) / (2 * math.pi))
    return above + floor * (1 - p_star)


@pytest.mark.parametrize("final", [0.0, 0.05])
def test_the_twin_takes_fewer_updates_by_the_mean_of_the_cosine(final):
    warmup = 2.0
    cosine = make("cosine", warmup_epochs=warmup, cosine_final_lr_factor=final)
    twin = make("increase_batch_cosine", warmup_epochs=warmup, cosine_final_lr_factor=final)
    steps_cosine, steps_twin = sum(1 for _ in walk(cosine)), sum(1 for _ in walk(twin))
    assert steps_cosine == math.ceil(EPOCHS * N / B0)  # 7813
    # Warmup epochs at B0, then the mean of max(c, B0/cap) over the cosine's epochs.
    mean = mean_cosine_factor_with_floor(floor=B0 / CAP, final=final)
    ratio = (warmup + (EPOCHS - warmup) * mean) / EPOCHS
    assert steps_twin / steps_cosine == pytest.approx(ratio, rel=0.005)
    # About half as many. Final 0: the cap (B0/cap = 1/64) is reached at 94% of the cosine, mean 0.5008.
    # Final 0.05: the batch ends at B0/0.05 = 20 B0, below the cap, and the mean is (1 + 0.05)/2.
    assert ratio == pytest.approx({0.0: 0.5258, 0.05: 0.54875}[final], abs=1e-4)


def test_from_the_cap_on_the_lr_takes_over_and_g_still_matches():
    cosine, twin = make("cosine"), make("increase_batch_cosine")
    # No warmup, final 0: c(p) = (1 + cos(pi p)) / 2 falls below B0/cap = 1/64 at cos(pi p*) = 2/64 - 1.
    reach_epoch = EPOCHS * math.acos(2 / 64 - 1) / math.pi  # 37.75
    before = twin.state_at(round((reach_epoch - 0.05) * N))
    assert before.global_batch_size < CAP and before.lr == LR
    lrs = []
    for epoch in (reach_epoch + 0.05, 38.5, 39.0, 39.5, 39.9):
        samples = round(epoch * N)
        state, ref = twin.state_at(samples), cosine.state_at(samples)
        assert state.global_batch_size == CAP
        c = cosine_factor(samples / N, warmup=0.0, total=EPOCHS, final=0.0)
        assert state.lr == pytest.approx(LR * c * CAP / B0, rel=1e-6)  # lr0 x g_cos / g_at_cap
        assert state.noise_scale == pytest.approx(ref.noise_scale, rel=1e-9)  # no rounding at the cap
        lrs.append(state.lr)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01 * LR
    end = twin.state_at(round(EPOCHS * N))
    assert (end.global_batch_size, end.lr) == (CAP, 0.0)


@pytest.mark.parametrize("family", ["sgd", "normalized"])
def test_momentum_rule_and_warmup_combine_with_the_twin(family):
    """The twin with the momentum rule (m 0.9 -> 0.95 doubles B0 to 512) and a warmup keeps the plain
    cosine run's g (m 0.9, B0 256) during the warmup, exactly, and after it up to rounding.

    With normalised momentum there is no momentum rule: then the twin with warmup against the cosine."""
    common = dict(warmup_epochs=3.0, warmup_start_factor=0.1)
    rule = dict(momentum_rule_momentum=0.95) if family == "sgd" else {}

    def build(mode, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = ScheduleConfig(mode=mode, **common, **kw)
            return Schedule(cfg, base_lr=LR, base_momentum=MOMENTUM, base_global_batch_size=B0, dataset_size=N,
                            optimizer_family=family, batch_granularity=8, total_epochs=EPOCHS)

    cosine = build("cosine")
    twin = build("increase_batch_cosine", max_global_batch_size=CAP, **rule)
    start = 2 * B0 if family == "sgd" else B0
    effective = (1 - MOMENTUM) if family == "sgd" else 1.0  # g = lr N / (B (1 - m)), or lr N / B
    for samples, state in walk(twin):
        epoch = samples / N
        g_cosine = cosine.state_at(samples).noise_scale
        want = (LR * warmup_factor(epoch, warmup=3.0, start=0.1)
                * cosine_factor(epoch, warmup=3.0, total=EPOCHS, final=0.0) * N / (B0 * effective))
        assert g_cosine == pytest.approx(want, rel=1e-9, abs=1e-12)
        if epoch < 3.0:
            assert state.global_batch_size == start
            assert state.lr == pytest.approx(LR * warmup_factor(epoch, warmup=3.0, start=0.1), rel=1e-12)
            assert state.noise_scale == pytest.approx(g_cosine, rel=1e-12)
        elif g_cosine:
            assert abs(state.noise_scale / g_cosine - 1) <= 8 / (2 * state.global_batch_size) + 1e-12
        assert state.momentum == (0.95 if family == "sgd" else MOMENTUM)


def test_the_twin_warns_when_rounding_moves_the_noise_scale_by_more_than_1_percent():
    cfg = ScheduleConfig(mode="increase_batch_cosine", max_global_batch_size=CAP)
    common = dict(base_lr=LR, base_momentum=MOMENTUM, dataset_size=N, optimizer_family="sgd", total_epochs=EPOCHS)
    # G = B0 = 256: B can only be 256 or 512 at first, and 383 rounds down to 256, g 50% too high.
    with pytest.warns(UserWarning, match="up to 50.0% from the cosine's"):
        Schedule(cfg, base_global_batch_size=256, batch_granularity=256, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 8 / (2 x 512) = 0.8%: no warning
        Schedule(cfg, base_global_batch_size=512, batch_granularity=8, **common)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="cosine", milestones_epochs=(30,)), "milestones_epochs, factor and factors have no effect"),
    (dict(mode="increase_batch_cosine", milestones_epochs=(30, 60), max_global_batch_size=1024),
     "milestones_epochs, factor and factors have no effect"),
    (dict(mode="cosine", factor=5), "have no effect"),
    (dict(mode="increase_batch_cosine"), "set schedule.max_global_batch_size > 0"),
    (dict(mode="cosine", cosine_final_lr_factor=1.0), r"cosine_final_lr_factor=1.0 must be in \[0, 1\)"),
    (dict(mode="cosine", cosine_final_lr_factor=-0.1), "cosine_final_lr_factor=-0.1 must be"),
    (dict(mode="cosine", cosine_final_lr_factor=float("nan")), "cosine_final_lr_factor: nan is not a finite"),
    (dict(mode="decay_lr", milestones_epochs=(30,), cosine_final_lr_factor=0.1), "is not a cosine mode"),
])
def test_config_errors_name_the_field_and_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ScheduleConfig, kwargs)
    if "nan" not in match:  # the loader refuses nan before the dataclass sees it; built directly, it refuses too
        return
    with pytest.raises(ValueError, match="cosine_final_lr_factor=nan must be in"):
        ScheduleConfig(**kwargs)


def test_the_cosine_needs_the_run_length():
    cfg = ScheduleConfig(mode="cosine", warmup_epochs=5)
    common = dict(base_lr=LR, base_momentum=MOMENTUM, base_global_batch_size=B0, dataset_size=N,
                  optimizer_family="sgd", batch_granularity=8)
    for total in (None, 0.0, 5.0, float("inf")):
        with pytest.raises(ValueError, match="needs total_epochs = train.epochs > schedule.warmup_epochs=5"):
            Schedule(cfg, total_epochs=total, **common)
    Schedule(dataclasses.replace(cfg, mode="constant"), **common)  # the other modes do not need it
    with pytest.raises(ConfigError, match="Did you mean 'cosine_final_lr_factor'"):
        from_dict(ScheduleConfig, {"mode": "cosine", "cosine_final_lr": 0.1})


def test_check_refuses_a_cosine_without_epochs_and_accepts_the_twin_at_its_world_size():
    with pytest.raises(ConfigError, match="train.max_steps alone gives the cosine no length"):
        check(load_config(None, ["schedule.mode=cosine", "train.epochs=0", "train.max_steps=100"]))
    def twin(cap: int):
        return load_config(None, ["schedule.mode=increase_batch_cosine", f"schedule.max_global_batch_size={cap}",
                                  "train.global_batch_size=512", "train.micro_batch_size=64", "train.epochs=10",
                                  "schedule.cosine_final_lr_factor=0.01"])

    check(twin(4096), world_size=2)  # granularity 128: the twin rounds every batch it asks for to a multiple
    with pytest.raises(ConfigError, match="max_global_batch_size=4000 must be a multiple"):
        check(twin(4000), world_size=2)  # but the cap, where it stops, must be one already
