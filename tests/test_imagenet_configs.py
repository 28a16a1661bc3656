"""The ImageNet recipes in configs/imagenet/: strict loading, and the schedule each one asks for.

The expected (lr, B, m) tables are computed by hand from the papers' recipes (docs/theory.md sections 1
and 6), not from the schedule code: lr 0.1 per 256 scaled linearly to 3.2 at B=8192, warmup from 0.1
over 5 epochs (lr = 0.1 + 3.1 e / 5 at epoch e), lr / 10 at epochs 30, 60 and 80.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import yaml

from dist_train.config import Config, accumulation_steps, load_config, to_dict
from dist_train.schedule import Schedule, analytic_noise_scale, optimizer_family

REPO = Path(__file__).resolve().parents[1]
IMAGENET = REPO / "configs" / "imagenet"
N = 1_281_167  # ImageNet-1k training images
EPOCHS = (0, 1, 5, 29, 31, 61, 81)
WORLD_SIZES = (1, 8, 32)  # 256 x 32 = 8192: every batch below is a multiple

WARMUP_SGD = (0.1, 0.72, 3.2, 3.2)  # epochs 0, 1, 5, 29
RADAM_LR = 5e-4 * math.sqrt(8192 / 256)  # 2.828e-3, square-root scaling, no warmup

# file -> (lr, global batch, momentum) at each of EPOCHS
EXPECTED = {
    "goyal_sgd_b8192.yaml": [(lr, 8192, 0.9) for lr in WARMUP_SGD]
    + [(0.32, 8192, 0.9), (0.032, 8192, 0.9), (0.0032, 8192, 0.9)],
    "smith_increase_batch_b8192_16384.yaml": [(lr, 8192, 0.9) for lr in WARMUP_SGD]
    + [(3.2, 16384, 0.9), (0.32, 16384, 0.9), (0.032, 16384, 0.9)],
    "smith_momentum_0.9_b8192.yaml": [(lr, 8192, 0.9) for lr in WARMUP_SGD]
    + [(0.32, 8192, 0.9), (0.032, 8192, 0.9), (0.0032, 8192, 0.9)],
    "smith_momentum_0.95_b16384.yaml": [(lr, 16384, 0.95) for lr in WARMUP_SGD]
    + [(0.32, 16384, 0.95), (0.032, 16384, 0.95), (0.0032, 16384, 0.95)],
    "smith_momentum_0.975_b32768.yaml": [(lr, 32768, 0.975) for lr in WARMUP_SGD]
    + [(0.32, 32768, 0.975), (0.032, 32768, 0.975), (0.0032, 32768, 0.975)],
    "radam_lookahead_b8192.yaml": [(RADAM_LR, 8192, 0.9)] * 4
    + [(RADAM_LR / 10, 8192, 0.9), (RADAM_LR / 100, 8192, 0.9), (RADAM_LR / 1000, 8192, 0.9)],
    "radam_lookahead_increase_batch.yaml": [(RADAM_LR, 8192, 0.9)] * 4
    + [(RADAM_LR, 16384, 0.9), (RADAM_LR / 10, 16384, 0.9), (RADAM_LR / 100, 16384, 0.9)],
}
MOMENTUM_VARIANTS = ("smith_momentum_0.9_b8192.yaml", "smith_momentum_0.95_b16384.yaml",
                     "smith_momentum_0.975_b32768.yaml")


def schedule_of(cfg: Config, *, world_size: int) -> Schedule:
    return Schedule(cfg.schedule, base_lr=cfg.optim.lr, base_momentum=cfg.optim.momentum,
                    base_global_batch_size=cfg.train.global_batch_size, dataset_size=N,
                    optimizer_family=optimizer_family(cfg.optim.name),
                    batch_granularity=cfg.train.micro_batch_size * world_size)


def test_every_recipe_has_a_table():
    assert sorted(p.name for p in IMAGENET.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_strictly_as_resnet50_on_imagenet(name):
    cfg = load_config(IMAGENET / name)
    assert cfg.model.name == "resnet50" and cfg.model.channels_last
    assert cfg.data.shards == "data/shards/imagenet" and cfg.data.image_size == 224
    assert cfg.train.epochs == 90 and cfg.train.precision == "auto"
    assert cfg.train.global_batch_size == 8192 and cfg.train.micro_batch_size == 256
    assert cfg.schedule.milestones_epochs == (30, 60, 80)
    assert Path(cfg.train.run_dir).name == Path(name).stem == cfg.tracking.run_name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_holds_only_differences_from_the_defaults(name):
    defaults = to_dict(Config())

    def walk(node: dict, default: dict, where: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                walk(value, default[key], f"{where}{key}.")
            else:
                got = list(value) if isinstance(value, (list, tuple)) else value
                assert got != default.get(key), f"{where}{key}={value!r} repeats the default"

    walk(yaml.safe_load((IMAGENET / name).read_text()), defaults, "")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_states_what_the_paper_reports(name):
    header = "".join(line for line in (IMAGENET / name).read_text().splitlines(keepends=True)
                     if line.startswith("#"))
    assert "top-1" in header and "%" in header and ("hour" in header or "minutes" in header)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_schedule_gives_the_hand_computed_lr_batch_and_momentum(name, world_size):
    cfg = load_config(IMAGENET / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no batch may need rounding to the granularity
        schedule = schedule_of(cfg, world_size=world_size)
    for epoch, (lr, batch, momentum) in zip(EPOCHS, EXPECTED[name]):
        state = schedule.state_at(epoch * N)
        assert (state.lr, state.global_batch_size, state.momentum) == (pytest.approx(lr, rel=1e-9), batch, momentum), \
            f"{name} at epoch {epoch}"
        accumulation_steps(batch, micro_batch_size=cfg.train.micro_batch_size, world_size=world_size)


def test_the_three_momentum_starts_share_one_noise_scale_at_every_epoch():
    schedules = [schedule_of(load_config(IMAGENET / name), world_size=32) for name in MOMENTUM_VARIANTS]
    starts = [(s.momentum, s.start_global_batch_size) for s in schedules]
    assert starts == [(0.9, 8192), (0.95, 16384), (0.975, 32768)]
    for epoch in EPOCHS:
        scales = []
        for schedule in schedules:
            state = schedule.state_at(epoch * N)
            scales.append(analytic_noise_scale(lr=state.lr, global_batch_size=state.global_batch_size,
                                               momentum=state.momentum, dataset_size=N, family="sgd"))
        assert scales == pytest.approx([scales[0]] * 3, rel=1e-9), f"epoch {epoch}"
    # at epoch 81, after the third decay: g = 0.0032 N / (8192 x 0.1)
    assert scales[0] == pytest.approx(0.0032 / 0.1 * N / 8192, rel=1e-9)


def test_batch_growth_halves_the_noise_scale_at_epoch_30():
    for name in ("smith_increase_batch_b8192_16384.yaml", "radam_lookahead_increase_batch.yaml"):
        schedule = schedule_of(load_config(IMAGENET / name), world_size=32)
        before, after = schedule.state_at(29 * N), schedule.state_at(31 * N)
        assert after.noise_scale == pytest.approx(before.noise_scale / 2, rel=1e-9)
