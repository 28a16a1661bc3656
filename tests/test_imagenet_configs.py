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
# --- torchvision's recipes, their batch-growth twins and their Lookahead(RAdam) counterparts ------------------
# Hand-computed from torchvision's published recipes (references/classification): V1 is lr 0.1 at B=256, lr / 10
# every 30 epochs, 90 epochs; the new recipe is lr 0.5 at B=1024, 5 warmup epochs from 0.01 x lr, then a cosine to
# 0 over the 595 epochs left of 600. The twins keep the lr and multiply B by what the lr was divided by.
V1_LR = {0: 0.1, 1: 0.1, 29: 0.1, 31: 0.01, 61: 0.001, 89: 0.001}
NEW_EPOCHS = (0, 1, 5, 100, 300, 550, 599)
CAP = 32768


def _cosine(epoch: float, *, warmup: float, total: float) -> float:
    """The cosine's lr factor after warmup (1 at its start, 0 at the end)."""
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (total - warmup)))


def _new_recipe_lr(epoch: float) -> float:
    return 0.5 * (0.01 + 0.99 * epoch / 5) if epoch < 5 else 0.5 * _cosine(epoch, warmup=5, total=600)


# file -> (optimizer family, {epoch: (lr, B or None for "the twin's rounded B")}, micro override at 32 ranks)
TORCHVISION: dict[str, tuple[str, dict[float, tuple[float, int | None]], int]] = {
    "torchvision_v1_b256.yaml": ("sgd", {e: (lr, 256) for e, lr in V1_LR.items()}, 8),
    "torchvision_v1_increase_batch.yaml": (
        "sgd", {e: (0.1, 256 * round(0.1 / lr)) for e, lr in V1_LR.items()}, 8),
    "radam_lookahead_torchvision_v1.yaml": ("normalized", {e: (5e-3 * lr, 256) for e, lr in V1_LR.items()}, 8),
    "torchvision_new_b1024.yaml": ("sgd", {e: (_new_recipe_lr(e), 1024) for e in NEW_EPOCHS}, 32),
    "torchvision_new_increase_batch_cosine.yaml": ("sgd", {e: (_new_recipe_lr(e), None) for e in NEW_EPOCHS}, 32),
    "radam_lookahead_torchvision_new.yaml": (
        "normalized", {e: (1e-3 * _cosine(e, warmup=0, total=600), 1024) for e in NEW_EPOCHS}, 32),
    "radam_lookahead_torchvision_new_increase_batch_cosine.yaml": (
        "normalized", {e: (1e-3 * _cosine(e, warmup=0, total=600), None) for e in NEW_EPOCHS}, 32),
}


MOMENTUM_VARIANTS = ("smith_momentum_0.9_b8192.yaml", "smith_momentum_0.95_b16384.yaml",
                     "smith_momentum_0.975_b32768.yaml")


def schedule_of(cfg: Config, *, world_size: int) -> Schedule:
    return Schedule(cfg.schedule, base_lr=cfg.optim.lr, base_momentum=cfg.optim.momentum,
                    base_global_batch_size=cfg.train.global_batch_size, dataset_size=N,
                    optimizer_family=optimizer_family(cfg.optim.name),
                    batch_granularity=cfg.train.micro_batch_size * world_size, total_epochs=cfg.train.epochs)


def test_every_recipe_has_a_table():
    assert sorted(p.name for p in IMAGENET.glob("*.yaml")) == sorted([*EXPECTED, *TORCHVISION])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_strictly_as_resnet50_on_imagenet(name):
    cfg = load_config(IMAGENET / name)
    assert cfg.model.name == "resnet50" and cfg.model.channels_last
    assert cfg.data.shards == "data/shards/imagenet" and cfg.data.image_size == 224
    assert cfg.train.epochs == 90 and cfg.train.precision == "auto"
    assert cfg.train.global_batch_size == 8192 and cfg.train.micro_batch_size == 256
    assert cfg.schedule.milestones_epochs == (30, 60, 80)
    assert Path(cfg.train.run_dir).name == Path(name).stem == cfg.tracking.run_name


@pytest.mark.parametrize("name", sorted([*EXPECTED, *TORCHVISION]))
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


def _header(name: str) -> str:
    return "".join(line for line in (IMAGENET / name).read_text().splitlines(keepends=True) if line.startswith("#"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_states_what_the_paper_reports(name):
    header = _header(name)
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


def _is_twin(name: str) -> bool:
    return load_config(IMAGENET / name).schedule.mode == "increase_batch_cosine"


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_recipe_loads_strictly_as_resnet50_on_imagenet(name):
    cfg = load_config(IMAGENET / name)
    assert cfg.model.name == "resnet50" and cfg.model.channels_last and cfg.data.shards == "data/shards/imagenet"
    assert Path(cfg.train.run_dir).name == Path(name).stem == cfg.tracking.run_name
    header = _header(name)
    assert "top-1" in header and "%" in header and "no training time" in header
    if "_new" in name:  # the new recipe's parts, all of them
        assert (cfg.data.image_size, cfg.data.eval_image_size, cfg.data.eval_resize) == (176, 224, 232)
        assert (cfg.data.auto_augment, cfg.data.random_erasing, cfg.data.repeated_augmentation) == \
            ("trivialaugment", 0.1, 4)
        assert (cfg.train.label_smoothing, cfg.train.mixup_alpha, cfg.train.cutmix_alpha) == (0.1, 0.2, 1.0)
        assert (cfg.train.ema_every_steps, cfg.train.ema_decay) == (32, pytest.approx(1 - 2e-5 * 8 * 128 * 32 / 600,
                                                                                       abs=1e-5))
        assert cfg.train.epochs == 600 and cfg.train.global_batch_size == 1024
        assert not cfg.optim.weight_decay_norm_and_bias  # torchvision's --norm-weight-decay 0
    else:
        assert cfg.train.epochs == 90 and cfg.train.global_batch_size == 256 and cfg.data.image_size == 224
        assert cfg.optim.weight_decay_norm_and_bias == (cfg.optim.name == "sgd")  # torchvision decays all of them
    assert optimizer_family(cfg.optim.name) == TORCHVISION[name][0]


def _micro_at(name: str, world_size: int) -> list[str]:
    """At 32 ranks the recipes' micro-batch does not divide their starting batch; the header names the fix."""
    micro = TORCHVISION[name][2]
    return [f"train.micro_batch_size={micro}"] if world_size == 32 and \
        load_config(IMAGENET / name).train.micro_batch_size * 32 > load_config(IMAGENET / name).train.global_batch_size \
        else []


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_at_32_ranks_the_check_names_the_micro_batch_the_header_gives(name):
    from dist_train.config import ConfigError, check

    cfg = load_config(IMAGENET / name)
    if cfg.train.micro_batch_size * 32 <= cfg.train.global_batch_size:
        check(cfg, world_size=32)
        return
    with pytest.raises(ConfigError, match="micro_batch_size"):
        check(cfg, world_size=32)
    assert f"train.micro_batch_size={TORCHVISION[name][2]}" in _header(name)
    check(load_config(IMAGENET / name, _micro_at(name, 32)), world_size=32)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_schedule_gives_the_hand_computed_lr_and_batch(name, world_size):
    cfg = load_config(IMAGENET / name, _micro_at(name, world_size))
    granularity = cfg.train.micro_batch_size * world_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if _is_twin(name) else "error")  # only the twins round their batch
        schedule = schedule_of(cfg, world_size=world_size)
    family, table, _ = TORCHVISION[name]
    for epoch, (lr, batch) in table.items():
        state = schedule.state_at(math.ceil(epoch * N))
        assert state.momentum == 0.9
        if batch is not None:
            assert (state.lr, state.global_batch_size) == (pytest.approx(lr, rel=1e-6), batch), f"epoch {epoch}"
            continue
        # The twin: the cosine run's lr during warmup (SGD's 5 epochs); then the lr stays at the base and
        # B = B0 / c, rounded to the nearest multiple of micro x world size, up to the cap; then the lr falls.
        base, warmup = (0.5, 5) if family == "sgd" else (1e-3, 0)
        if epoch < warmup:
            assert (state.lr, state.global_batch_size) == (pytest.approx(lr, rel=1e-6), 1024), f"epoch {epoch}"
            continue
        c = _cosine(epoch, warmup=warmup, total=600)
        wanted = 1024 / c
        if wanted <= CAP:
            assert state.lr == pytest.approx(base, rel=1e-6), f"epoch {epoch}"
            assert abs(state.global_batch_size - wanted) <= granularity / 2, f"epoch {epoch}"
        else:
            assert state.global_batch_size == CAP and state.lr == pytest.approx(base * c * CAP / 1024, rel=1e-6)
        assert state.global_batch_size % granularity == 0
        accumulation_steps(state.global_batch_size, micro_batch_size=cfg.train.micro_batch_size,
                           world_size=world_size)


@pytest.mark.parametrize("name, twin", [("torchvision_new_b1024.yaml", "torchvision_new_increase_batch_cosine.yaml"),
                                        ("radam_lookahead_torchvision_new.yaml",
                                         "radam_lookahead_torchvision_new_increase_batch_cosine.yaml"),
                                        ("torchvision_v1_b256.yaml", "torchvision_v1_increase_batch.yaml")])
def test_a_twin_keeps_the_noise_scale_of_its_recipe_with_fewer_updates(name, twin):
    def schedule(file: str) -> tuple[Config, Schedule]:
        cfg = load_config(IMAGENET / file, ["train.micro_batch_size=8"])  # a fine batch step: g within 1%
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cfg, schedule_of(cfg, world_size=1)

    def g(cfg: Config, state) -> float:
        return analytic_noise_scale(lr=state.lr, global_batch_size=state.global_batch_size, momentum=state.momentum,
                                    dataset_size=N, family=optimizer_family(cfg.optim.name))

    (ref_cfg, reference), (twin_cfg, twinned) = schedule(name), schedule(twin)
    steps = math.ceil(ref_cfg.train.epochs * N / ref_cfg.train.global_batch_size)  # the recipe's B is constant
    samples, twin_steps = 0, 0
    while samples < twin_cfg.train.epochs * N:
        state = twinned.state_at(samples)
        if twin_steps % 97 == 0:
            assert g(twin_cfg, state) == pytest.approx(g(ref_cfg, reference.state_at(samples)), rel=0.02), samples
        samples += state.global_batch_size
        twin_steps += 1
    assert twin_steps < 0.6 * steps
