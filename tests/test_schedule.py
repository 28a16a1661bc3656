"""The noise-scale schedule against hand-computed tables (Smith et al., docs/theory.md section 1)."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from dist_train.config import ConfigError, from_dict
from dist_train.schedule import (
    Schedule,
    ScheduleConfig,
    analytic_noise_scale,
    effective_lr,
    momentum_rule_batch_size,
    optimizer_family,
    round_to_granularity,
)

CIFAR_N = 50_000
IMAGENET_N = 1_281_167


def cifar(mode: str, **cfg_kwargs) -> Schedule:
    """Smith et al.'s Wide-ResNet schedule: B=128, eps=0.1, m=0.9, a factor 5 at epochs 60, 120, 160."""
    cfg = ScheduleConfig(mode=mode, milestones_epochs=(60, 120, 160), factor=5, **cfg_kwargs)
    return Schedule(cfg, base_lr=0.1, base_momentum=0.9, base_global_batch_size=128, dataset_size=CIFAR_N,
                    optimizer_family="sgd", batch_granularity=128)


def table(sched: Schedule, epochs: list[float], **kwargs) -> list[tuple[float, int]]:
    return [(round(s.lr, 12), s.global_batch_size)
            for s in (sched.state_at(round(e * sched.dataset_size), **kwargs) for e in epochs)]


EPOCHS = [0, 59.99, 60, 119.99, 120, 160, 200]


def test_cifar_increase_batch_keeps_lr_and_multiplies_batch():
    assert table(cifar("increase_batch"), EPOCHS) == [
        (0.1, 128), (0.1, 128), (0.1, 640), (0.1, 640), (0.1, 3200), (0.1, 16000), (0.1, 16000)]


def test_cifar_decay_lr_divides_lr_by_5():
    assert table(cifar("decay_lr"), EPOCHS) == [
        (0.1, 128), (0.1, 128), (0.02, 128), (0.02, 128), (0.004, 128), (0.0008, 128), (0.0008, 128)]


def test_cifar_hybrid_grows_batch_once_then_decays_lr():
    assert table(cifar("hybrid", max_global_batch_size=640), EPOCHS) == [
        (0.1, 128), (0.1, 128), (0.1, 640), (0.1, 640), (0.02, 640), (0.004, 640), (0.004, 640)]


def test_all_three_modes_follow_the_same_noise_scale_path():
    scheds = [cifar("decay_lr"), cifar("increase_batch"), cifar("hybrid", max_global_batch_size=640)]
    for e in EPOCHS:
        g = [s.state_at(round(e * CIFAR_N)).noise_scale for s in scheds]
        assert g == pytest.approx([g[0]] * 3, rel=1e-12)
    # g = eps N / (B (1 - m)) = 0.1 * 50000 / (128 * 0.1) at the start, then / 5 per milestone.
    assert scheds[0].state_at(0).noise_scale == pytest.approx(390.625)
    assert scheds[1].state_at(160 * CIFAR_N).noise_scale == pytest.approx(390.625 / 125)


def test_hybrid_cap_between_milestones_splits_the_factor():
    # From 3200 a factor 5 would give 16000; the cap 6400 takes x2 of it and the lr the remaining /2.5.
    sched = cifar("hybrid", max_global_batch_size=6400)
    assert table(sched, [0, 60, 120, 160]) == [(0.1, 128), (0.1, 640), (0.1, 3200), (0.04, 6400)]


def test_imagenet_batch_doubles_at_30_then_lr_decays_at_60_and_80():
    """ResNet-50: B=8192 for 30 epochs, then 16384; lr /10 at 60 and 80; Goyal's rule and 5 warmup epochs."""
    cfg = ScheduleConfig(mode="hybrid", milestones_epochs=(30, 60, 80), factors=(2, 10, 10),
                         max_global_batch_size=16384, lr_scaling="linear", reference_global_batch_size=256,
                         warmup_epochs=5)
    sched = Schedule(cfg, base_lr=0.1, base_momentum=0.9, base_global_batch_size=8192, dataset_size=IMAGENET_N,
                     optimizer_family="sgd", batch_granularity=256)
    assert table(sched, [5, 29.9, 30, 59.9, 60, 80, 90]) == [
        (3.2, 8192), (3.2, 8192), (3.2, 16384), (3.2, 16384), (0.32, 16384), (0.032, 16384), (0.032, 16384)]
    assert [s.milestones_passed for s in (sched.state_at(round(e * IMAGENET_N)) for e in (0, 30, 60, 80))] == \
        [0, 1, 2, 3]


def test_imagenet_factor_10_with_cap_keeps_decay_lr_noise_path():
    kwargs = dict(milestones_epochs=(30, 60, 80), factor=10)
    common = dict(base_lr=3.2, base_momentum=0.9, base_global_batch_size=8192, dataset_size=IMAGENET_N,
                  optimizer_family="sgd", batch_granularity=256)
    hybrid = Schedule(ScheduleConfig(mode="hybrid", max_global_batch_size=16384, **kwargs), **common)
    decay = Schedule(ScheduleConfig(mode="decay_lr", **kwargs), **common)
    assert table(hybrid, [0, 30, 60, 80]) == [(3.2, 8192), (0.64, 16384), (0.064, 16384), (0.0064, 16384)]
    for e in (0, 30, 60, 80):
        s = round(e * IMAGENET_N)
        assert hybrid.state_at(s).noise_scale == pytest.approx(decay.state_at(s).noise_scale, rel=1e-12)


def test_momentum_rule_starts_keep_the_noise_scale():
    starts = [(0.9, 8192), (0.95, 16384), (0.975, 32768)]
    g = [analytic_noise_scale(lr=3.2, global_batch_size=b, momentum=m, dataset_size=IMAGENET_N, family="sgd")
         for m, b in starts]
    assert g == pytest.approx([g[0]] * 3, rel=1e-12)
    assert [momentum_rule_batch_size(8192, momentum=0.9, new_momentum=m) for m, _ in starts] == [8192, 16384, 32768]
    # Normalised momentum: beta does not enter g, so there is no batch to trade.
    assert momentum_rule_batch_size(8192, momentum=0.9, new_momentum=0.975, family="normalized") == 8192


def test_momentum_rule_in_the_schedule():
    cfg = ScheduleConfig(mode="decay_lr", milestones_epochs=(30,), momentum_rule_momentum=0.975)
    common = dict(base_lr=3.2, base_momentum=0.9, base_global_batch_size=8192, dataset_size=IMAGENET_N,
                  batch_granularity=256)
    sched = Schedule(cfg, optimizer_family="sgd", **common)
    plain = Schedule(dataclasses.replace(cfg, momentum_rule_momentum=None), optimizer_family="sgd", **common)
    for e in (0, 30):
        state, ref = sched.state_at(e * IMAGENET_N), plain.state_at(e * IMAGENET_N)
        assert (state.global_batch_size, state.momentum, state.lr) == (32768, 0.975, ref.lr)
        assert state.noise_scale == pytest.approx(ref.noise_scale, rel=1e-12)
    with pytest.raises(ValueError, match="momentum_rule_momentum applies to momentum SGD"):
        Schedule(cfg, optimizer_family="normalized", **common)


def test_normalized_family_effective_lr_and_noise_scale():
    assert optimizer_family("sgd") == "sgd"
    assert {optimizer_family(n) for n in ("radam", "qhm", "adamw")} == {"normalized"}
    assert effective_lr(0.1, momentum=0.9, family="sgd") == pytest.approx(1.0)
    assert effective_lr(0.1, momentum=0.9, family="normalized") == 0.1
    # Normalised momentum with lr alpha is unnormalised momentum with eps = alpha (1 - beta): same g.
    alpha, beta = 1e-3, 0.9
    g_norm = analytic_noise_scale(lr=alpha, global_batch_size=512, momentum=beta, dataset_size=CIFAR_N,
                                  family="normalized")
    g_sgd = analytic_noise_scale(lr=alpha * (1 - beta), global_batch_size=512, momentum=beta,
                                 dataset_size=CIFAR_N, family="sgd")
    assert g_norm == pytest.approx(g_sgd) == pytest.approx(alpha * CIFAR_N / 512)
    with pytest.raises(ValueError, match="no momentum family"):
        optimizer_family("lars")


def test_linear_warmup_to_the_linearly_scaled_lr():
    cfg = ScheduleConfig(warmup_epochs=5, lr_scaling="linear", reference_global_batch_size=256)
    sched = Schedule(cfg, base_lr=0.1, base_momentum=0.9, base_global_batch_size=8192, dataset_size=1000,
                     optimizer_family="sgd", batch_granularity=256)
    assert [sched.state_at(s).lr for s in (0, 1250, 2500, 5000, 9000)] == pytest.approx([0, 0.8, 1.6, 3.2, 3.2])
    goyal = Schedule(dataclasses.replace(cfg, warmup_start_factor=1 / 32), base_lr=0.1, base_momentum=0.9,
                     base_global_batch_size=8192, dataset_size=1000, optimizer_family="sgd", batch_granularity=256)
    assert [goyal.state_at(s).lr for s in (0, 2500, 5000)] == pytest.approx([0.1, 1.65, 3.2])


def test_lr_scaling_rules():
    def start_lr(scaling: str) -> float:
        cfg = ScheduleConfig(lr_scaling=scaling, reference_global_batch_size=256)
        return Schedule(cfg, base_lr=0.1, base_momentum=0.0, base_global_batch_size=1024, dataset_size=10_000,
                        optimizer_family="sgd", batch_granularity=1).state_at(0).lr

    assert [start_lr(s) for s in ("none", "linear", "sqrt")] == pytest.approx([0.1, 0.4, 0.2])


def test_batches_are_rounded_to_the_granularity_with_a_warning():
    rounded = [round_to_granularity(b, batch_granularity=256) for b in (1, 127, 128, 640, 700)]
    assert rounded == [256, 256, 256, 768, 768]
    cfg = ScheduleConfig(mode="increase_batch", milestones_epochs=(1,), factor=2.5)
    with pytest.warns(UserWarning, match="rounded to 768"):
        sched = Schedule(cfg, base_lr=0.1, base_momentum=0.9, base_global_batch_size=256, dataset_size=10_000,
                         optimizer_family="sgd", batch_granularity=256)
    assert sched.state_at(10_000).global_batch_size == 768


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_global_batch_size=200), "train.global_batch_size=200 must be a positive multiple"),
    (dict(cfg=ScheduleConfig(mode="hybrid", milestones_epochs=(1,), max_global_batch_size=1000)),
     "max_global_batch_size=1000 must be a multiple"),
    (dict(cfg=ScheduleConfig(mode="increase_batch", milestones_epochs=(1, 2), max_global_batch_size=1024)),
     "use mode 'hybrid'"),
    (dict(cfg=ScheduleConfig(mode="hybrid", milestones_epochs=(1,), max_global_batch_size=128)),
     "starting global batch 256 exceeds"),
    (dict(optimizer_family="adam"), "optimizer_family"),
    (dict(base_lr=0.0), "base_lr"),
])
def test_schedule_arguments_are_checked(kwargs, match):
    args = dict(cfg=ScheduleConfig(), base_lr=0.1, base_momentum=0.9, base_global_batch_size=256,
                dataset_size=10_000, optimizer_family="sgd", batch_granularity=128)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Schedule(args.pop("cfg"), **args)


def test_adaptive_batch_is_passed_in_and_moves_the_lr():
    cfg = from_dict(ScheduleConfig, {"mode": "adaptive", "milestones_epochs": [10], "factor": 10,
                                     "max_global_batch_size": 1024, "noise_scale": {"enabled": True},
                                     "adaptive": {"lr_scaling": "linear"}})
    sched = Schedule(cfg, base_lr=0.1, base_momentum=0.9, base_global_batch_size=128, dataset_size=1000,
                     optimizer_family="sgd", batch_granularity=64)
    assert table(sched, [0, 10], global_batch_size=128) == [(0.1, 128), (0.01, 128)]
    assert table(sched, [0, 10], global_batch_size=512) == [(0.4, 512), (0.04, 512)]
    with pytest.raises(ValueError, match="pass global_batch_size"):
        sched.state_at(0)
    with pytest.raises(ValueError, match="multiple of 64 and at most 1024"):
        sched.state_at(0, global_batch_size=2048)
    with pytest.raises(ValueError, match="only in adaptive mode"):
        cifar("decay_lr").state_at(0, global_batch_size=128)


@pytest.mark.parametrize("kwargs, match", [
    (dict(factor=1.0), "schedule.factor must be > 1"),
    (dict(mode="decay_lr", milestones_epochs=(60, 30)), "milestones_epochs must be increasing"),
    (dict(mode="decay_lr", milestones_epochs=(30, 60), factors=(2,)), "schedule.factors has 1 entries"),
    (dict(milestones_epochs=(30,)), "no effect with schedule.mode='constant'"),
    (dict(mode="hybrid", milestones_epochs=(30,)), "set schedule.max_global_batch_size > 0"),
    (dict(warmup_epochs=-1), "schedule.warmup_epochs"),
    (dict(momentum_rule_momentum=1.0), "schedule.momentum_rule_momentum=1.0 must be in"),
    (dict(mode="adaptive", max_global_batch_size=1024), "set schedule.noise_scale.enabled=true"),
    (dict(adaptive={"margin": 2.0}), "schedule.mode is not 'adaptive'"),
    (dict(noise_scale={"ema_decay": 1.0}), "schedule.noise_scale.ema_decay=1.0"),
    (dict(mode="adaptive", max_global_batch_size=1024, noise_scale={"enabled": True},
          adaptive={"growth_factor": 1.0}), "schedule.adaptive.growth_factor"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ScheduleConfig, kwargs)


def test_config_loads_nested_sections_strictly():
    cfg = from_dict(ScheduleConfig, {"mode": "hybrid", "milestones_epochs": [30, 60, 80], "factors": [2, 10, 10],
                                     "max_global_batch_size": 16384, "noise_scale": {"enabled": True}})
    assert cfg.milestone_factors == (2.0, 10.0, 10.0) and cfg.noise_scale.enabled
    assert ScheduleConfig(mode="decay_lr", milestones_epochs=(1, 2), factor=5).milestone_factors == (5.0, 5.0)
    with pytest.raises(ConfigError, match="Did you mean 'ema_decay'"):
        from_dict(ScheduleConfig, {"noise_scale": {"ema_decy": 0.9}})


def test_schedule_package_does_not_import_torch():
    import subprocess

    code = "import sys, dist_train.schedule; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    sched = Schedule(ScheduleConfig(), base_lr=0.1, base_momentum=0.9, base_global_batch_size=128,
                     dataset_size=CIFAR_N, optimizer_family="sgd", batch_granularity=128)
    assert table(sched, [0, 100]) == [(0.1, 128), (0.1, 128)]
