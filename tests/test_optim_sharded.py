"""Sharded optimizer state (ZeRO-1) on 2 real gloo ranks against the unsharded optimizer in one process.

One spawn runs every scenario (spawning costs more than the training here): DDP averages the gradients
of each rank's half batch, the sharded optimizer steps; the reference trains on the full batch.
"""

from __future__ import annotations

import io
import random

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks

from dist_train.optim import (
    LookaheadConfig,
    OptimConfig,
    build_optimizer,
    has_slow_weights,
    optimizer_state_bytes,
    set_hyperparams,
    slow_weights,
)
from dist_train.optim.sharded import _flat, partition

STEPS, CHECKPOINT_STEP = 20, 10
CONFIGS = {
    "radam": OptimConfig(name="radam", lr=0.01, weight_decay=0.01),
    "lookahead_radam": OptimConfig(name="radam", lr=0.01, weight_decay=0.01, decoupled_weight_decay=True,
                                   lookahead=LookaheadConfig(k=3, alpha=0.5)),
    "lookahead_qhm": OptimConfig(name="qhm", lr=0.05, lookahead=LookaheadConfig(k=4, alpha=0.3)),
    "adamw": OptimConfig(name="adamw", lr=0.01, decoupled_weight_decay=True),
    "sgd": OptimConfig(name="sgd", lr=0.05, nesterov=True),
}


def test_partition_tiles_every_parameter_once_with_even_shards():
    rng = random.Random(0)
    for _ in range(200):
        numels = [rng.choice([0, 1, 2, 7, 100, 1000]) for _ in range(rng.randint(1, 12))]
        world_size = rng.randint(1, 5)
        shard_numel, layout = partition(numels, world_size)
        covered = [[0] * n for n in numels]
        for pieces in layout:
            assert sum(pc.stop - pc.start for pc in pieces) <= shard_numel
            for pc in pieces:
                assert 0 <= pc.start < pc.stop <= numels[pc.param_index]
                for e in range(pc.start, pc.stop):
                    covered[pc.param_index][e] += 1
        assert all(c == 1 for row in covered for c in row)
        sizes = [sum(pc.stop - pc.start for pc in pieces) for pieces in layout]
        assert sum(sizes) == sum(numels) and max(sizes) - min(sizes) < world_size


def test_flat_follows_memory_order():
    t = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last)
    flat = _flat(t, view=True)
    assert flat.data_ptr() == t.data_ptr() and torch.equal(flat, t.permute(0, 2, 3, 1).reshape(-1))
    contiguous = t.contiguous()
    assert torch.equal(_flat(contiguous, like=t), flat)  # a gradient laid out differently is reordered


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    return model.to(memory_format=torch.channels_last)  # conv weights are not contiguous: shards follow memory


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 5, (16,), generator=gen)


def _hyperparams(cfg: OptimConfig, step: int) -> tuple[float, float]:
    """lr and momentum change mid-run, so set_hyperparams is exercised through every wrapper."""
    return (cfg.lr, cfg.momentum) if step < 5 else (cfg.lr * 0.5, 0.95)


def _train(model, forward, opt, cfg, steps: range, *, rank: int = 0, world_size: int = 1) -> None:
    for step in steps:
        lr, momentum = _hyperparams(cfg, step)
        set_hyperparams(opt, lr=lr, momentum=momentum)
        x, y = (t.chunk(world_size)[rank] for t in _batch(step))
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _sharded_rank(rank: int, world_size: int, reference_checkpoints: bytes) -> bytes:
    from torch.nn.parallel import DistributedDataParallel

    from dist_train.optim.sharded import ShardedOptimizer

    out = {}
    for key, cfg in CONFIGS.items():
        model = _model()
        ddp = DistributedDataParallel(model)
        opt = build_optimizer(model, cfg, shard=True)
        assert isinstance(opt, ShardedOptimizer)
        _train(model, ddp, opt, cfg, range(CHECKPOINT_STEP), rank=rank, world_size=world_size)
        checkpoint = _from_bytes(_to_bytes({"model": model.state_dict(), "optim": opt.state_dict()}))  # collective
        to_rank_0 = opt.consolidated_state_dict(dst=0)  # collective: gathered to rank 0 only
        checkpoint["to_rank_0"] = None if to_rank_0 is None else _from_bytes(_to_bytes(to_rank_0))
        _train(model, ddp, opt, cfg, range(CHECKPOINT_STEP, STEPS), rank=rank, world_size=world_size)
        with slow_weights(opt):  # collective
            slow = _params(model)
        out[key] = {"params": _params(model), "slow": slow, "state_bytes": optimizer_state_bytes(opt),
                    "checkpoint": checkpoint, "after_slow": _params(model), "has_slow": has_slow_weights(opt)}

        # A checkpoint from one process resumes here, at world size 2.
        reference = _from_bytes(reference_checkpoints)[key]
        model = _model()
        model.load_state_dict(reference["model"])
        ddp = DistributedDataParallel(model)
        opt = build_optimizer(model, cfg, shard=True)
        opt.load_state_dict(reference["optim"])
        _train(model, ddp, opt, cfg, range(CHECKPOINT_STEP, STEPS), rank=rank, world_size=world_size)
        out[key]["resumed_from_1"] = _params(model)
    return _to_bytes(out)


def _unsharded(cfg: OptimConfig, *, resume_from: dict | None = None) -> dict:
    model = _model()
    opt = build_optimizer(model, cfg, shard=True)  # no process group here: the plain optimizer
    first = CHECKPOINT_STEP if resume_from else 0
    if resume_from:
        model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["optim"])
    _train(model, model, opt, cfg, range(first, CHECKPOINT_STEP))
    checkpoint = _from_bytes(_to_bytes({"model": model.state_dict(), "optim": opt.state_dict()}))
    _train(model, model, opt, cfg, range(max(first, CHECKPOINT_STEP), STEPS))
    with slow_weights(opt):
        slow = _params(model)
    return {"params": _params(model), "slow": slow, "state_bytes": optimizer_state_bytes(opt), "checkpoint": checkpoint,
            "has_slow": has_slow_weights(opt)}


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    reference = {key: _unsharded(cfg) for key, cfg in CONFIGS.items()}
    checkpoints = _to_bytes({key: ref["checkpoint"] for key, ref in reference.items()})
    ranks = [_from_bytes(b) for b in run_ranks(_sharded_rank, checkpoints, world_size=2)]
    return reference, ranks


def _assert_params_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_two_sharded_ranks_match_one_unsharded_process(runs, key):
    reference, ranks = runs
    for out in ranks:
        _assert_params_close(out[key]["params"], reference[key]["params"])
        _assert_params_close(out[key]["slow"], reference[key]["slow"])
        _assert_params_close(out[key]["after_slow"], out[key]["params"], atol=0)  # fast weights are back
    for a, b in zip(ranks[0][key]["params"], ranks[1][key]["params"]):
        assert torch.equal(a, b)
    moved = [(a - b).abs().max().item() for a, b in zip(reference[key]["params"], _params(_model()))]
    assert min(moved) > 1e-4  # every parameter trained, so a step lost on some rank would show


@pytest.mark.parametrize("key", ["radam", "lookahead_radam", "lookahead_qhm"])
def test_each_rank_holds_about_half_the_state(runs, key):
    reference, ranks = runs
    assert reference[key]["state_bytes"] > 0
    for out in ranks:
        assert out[key]["state_bytes"] <= 0.55 * reference[key]["state_bytes"]


@pytest.mark.parametrize("key", list(CONFIGS))
def test_consolidated_state_is_the_unsharded_state(runs, key):
    reference, ranks = runs
    ours, theirs = ranks[0][key]["checkpoint"]["optim"], reference[key]["checkpoint"]["optim"]
    assert ranks[1][key]["checkpoint"]["optim"]["state"].keys() == ours["state"].keys() == theirs["state"].keys()
    assert [{k: v for k, v in g.items() if k != "params"} for g in ours["param_groups"]] == \
           [{k: v for k, v in g.items() if k != "params"} for g in theirs["param_groups"]]
    for i, entries in theirs["state"].items():
        assert ours["state"][i].keys() == entries.keys()
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                assert ours["state"][i][name].shape == value.shape
                assert ours["state"][i][name].stride() == value.stride()
                torch.testing.assert_close(ours["state"][i][name], value, rtol=1e-5, atol=1e-6)
            else:
                assert ours["state"][i][name] == value


@pytest.mark.parametrize("key", list(CONFIGS))
def test_state_gathered_to_rank_0_only_is_the_same_state(runs, key):
    # What a checkpoint saves: rank 0 holds the whole state, rank 1 never more than its shard.
    _, ranks = runs
    assert ranks[1][key]["checkpoint"]["to_rank_0"] is None
    gathered, everywhere = ranks[0][key]["checkpoint"]["to_rank_0"], ranks[0][key]["checkpoint"]["optim"]
    assert gathered["param_groups"] == everywhere["param_groups"] and gathered["state"].keys() == everywhere["state"].keys()
    for i, entries in everywhere["state"].items():
        for name, value in entries.items():
            same = torch.equal(gathered["state"][i][name], value) if isinstance(value, torch.Tensor) else \
                gathered["state"][i][name] == value
            assert same, (i, name)


@pytest.mark.parametrize("key", ["radam", "lookahead_radam", "adamw"])
def test_checkpoint_from_two_ranks_resumes_in_one_process(runs, key):
    reference, ranks = runs
    resumed = _unsharded(CONFIGS[key], resume_from=ranks[0][key]["checkpoint"])
    _assert_params_close(resumed["params"], reference[key]["params"])
    _assert_params_close(resumed["params"], ranks[0][key]["params"])
    _assert_params_close(resumed["slow"], reference[key]["slow"])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_checkpoint_from_one_process_resumes_on_two_ranks(runs, key):
    reference, ranks = runs
    for out in ranks:
        _assert_params_close(out[key]["resumed_from_1"], reference[key]["params"])


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_has_slow_weights_sees_lookahead_through_the_sharded_optimizer(runs, key):
    # Checkpoints write the slow weights (model-slow.pt) exactly when this is true.
    reference, ranks = runs
    expected = CONFIGS[key].lookahead is not None
    assert reference[key]["has_slow"] is expected
    assert [rank[key]["has_slow"] for rank in ranks] == [expected, expected]
