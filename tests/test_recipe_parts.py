"""Recipe parts off by default: label smoothing, zero-initialised residual blocks, weight decay on every parameter.

Each expectation is computed here from its definition, not by the code under test: the smoothed loss from
log-softmax by hand, a zero-initialised block against relu(shortcut(x)), weight decay against p <- (1 - lr wd) p.
Each test also shows that the default behaves differently, so it could fail.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from harness import global_batches, make_trainer, train_losses
from multiproc import run_ranks
from torch import nn

from dist_train.config import ConfigError, load_config
from dist_train.models import build_model
from dist_train.optim import OptimConfig, build_optimizer


# --- label smoothing -------------------------------------------------------------------------------
def _by_hand(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> float:
    """(1 - eps) CE + eps x mean over the classes of -log p: cross-entropy against (1 - eps) one-hot + eps / K."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    nll = -log_p[torch.arange(len(labels)), labels]
    uniform = -log_p.mean(dim=1)
    return float(((1 - epsilon) * nll + epsilon * uniform).mean())


def _trainer_and_logits(epsilon: float):
    """A one-step trainer over 16 samples in 2 micro-batches, and the logits of its model before the step."""
    batches = global_batches(1, 16, seed=3)
    trainer = make_trainer(0, 1, batches=batches, micro=8, optim=OptimConfig(weight_decay=0.0))
    trainer.cfg = dataclasses.replace(trainer.cfg, label_smoothing=epsilon)
    with torch.no_grad():
        logits = trainer.backend.module(trainer.normalise(batches[0]["image"]))
    return trainer, batches[0], logits


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.4])
def test_training_loss_is_the_label_smoothing_formula(epsilon):
    trainer, batch, logits = _trainer_and_logits(epsilon)
    expected = _by_hand(logits, batch["label"], epsilon)
    assert train_losses(trainer, 1)[0] == pytest.approx(expected, rel=1e-6)
    if epsilon > 0:  # the smoothed loss is not plain cross-entropy: the comparison above can fail
        assert abs(expected - _by_hand(logits, batch["label"], 0.0)) > 1e-3


def test_evaluation_loss_stays_plain_cross_entropy():
    trainer, batch, logits = _trainer_and_logits(0.4)
    trainer.parts = dataclasses.replace(trainer.parts, eval_loader_fn=lambda: iter([batch]))
    assert trainer.evaluate()["eval/loss"] == pytest.approx(_by_hand(logits, batch["label"], 0.0), rel=1e-6)


@pytest.mark.parametrize("value", ["-0.1", "1.0", "1.5"])
def test_label_smoothing_outside_zero_to_one_is_an_error_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"train\.label_smoothing=.* must be in \[0, 1\)"):
        load_config(None, [f"train.label_smoothing={value}"])


# --- zero-initialised residual blocks ----------------------------------------------------------------
def _residual_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(block, its shortcut path) for every residual block of a torchvision or CIFAR ResNet."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from dist_train.models import _BasicBlock

    found = []
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):  # out = relu(bn_last(...) + (downsample or identity)(x))
            found.append((m, m.downsample if m.downsample is not None else nn.Identity()))
        elif isinstance(m, _BasicBlock):  # out = relu(bn2(...) + shortcut(x))
            found.append((m, m.shortcut))
    return found


def _blocks_that_are_relu_of_their_shortcut(model: nn.Module, *, train: bool) -> tuple[int, int]:
    """(blocks whose output equals relu(shortcut(input)) exactly, blocks) over one forward of a 32 px batch."""
    model.train(train)
    blocks = _residual_blocks(model)
    matches = []

    def check(shortcut):
        def hook(module, inputs, output):
            matches.append(torch.equal(output, torch.relu(shortcut(inputs[0]))))
        return hook

    handles = [block.register_forward_hook(check(shortcut)) for block, shortcut in blocks]
    try:
        with torch.no_grad():
            model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    return sum(matches), len(matches)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,n_blocks", [("resnet18", 8), ("resnet50", 16), ("cifar_resnet20", 9)])
def test_zero_init_residual_makes_every_block_relu_of_its_shortcut(name, n_blocks, train):
    torch.manual_seed(0)
    zeroed = build_model(name, num_classes=10, zero_init_residual=True)
    assert _blocks_that_are_relu_of_their_shortcut(zeroed, train=train) == (n_blocks, n_blocks)
    default = build_model(name, num_classes=10)
    assert _blocks_that_are_relu_of_their_shortcut(default, train=train) == (0, n_blocks)


def test_zero_init_residual_loads_from_the_config_and_is_strict():
    assert load_config(None, ["model.zero_init_residual=true"]).model.zero_init_residual
    with pytest.raises(ConfigError, match=r"model\.zero_init_residual: expected true or false"):
        load_config(None, ["model.zero_init_residual=1"])


# --- weight decay on normalisation weights and biases --------------------------------------------------
def _bn_net() -> nn.Module:
    """Conv weights and biases, BatchNorm and LayerNorm weights and biases, a linear layer: every kind of 1-D
    parameter, each set away from its initial value (BN's bias starts at 0, where decay could not show)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _decayed_once(model: nn.Module, opt: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(before, after) of every parameter after one step at lr 1 with zero gradients: weight decay only."""
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return list(zip(before, [p.detach().clone() for p in model.parameters()]))


def _expect(pairs, *, decay_norm_and_bias: bool, wd: float) -> None:
    for before, after in pairs:
        factor = 1 - wd if decay_norm_and_bias or before.ndim > 1 else 1.0  # lr = 1: p <- (1 - lr wd) p
        torch.testing.assert_close(after, factor * before, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "adamw"])  # L2 in the gradient, and decoupled
@pytest.mark.parametrize("on", [False, True])
def test_weight_decay_reaches_norm_weights_and_biases_only_when_asked(name, on):
    cfg = OptimConfig(name=name, lr=1.0, momentum=0.0 if name == "sgd" else 0.9, weight_decay=0.1,
                      decoupled_weight_decay=name == "adamw", weight_decay_norm_and_bias=on)
    model = _bn_net()
    pairs = _decayed_once(model, build_optimizer(model, cfg))
    assert sum(b.ndim <= 1 for b, _ in pairs) == 6  # the conv's and linear's biases, BN's and LN's weights and biases
    _expect(pairs, decay_norm_and_bias=on, wd=0.1)


def test_decaying_everything_is_one_group_and_a_resume_across_the_setting_is_refused():
    model = _bn_net()
    off = build_optimizer(model, OptimConfig(weight_decay=0.1))
    on = build_optimizer(model, OptimConfig(weight_decay=0.1, weight_decay_norm_and_bias=True))
    assert [g["weight_decay"] for g in off.param_groups] == [0.1, 0.0]
    assert [g["weight_decay"] for g in on.param_groups] == [0.1]
    assert [id(p) for p in on.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="different number of parameter groups"):
        on.load_state_dict(off.state_dict())


def test_norm_and_bias_decay_without_weight_decay_warns():
    with pytest.warns(UserWarning, match="weight_decay_norm_and_bias=true does nothing"):
        OptimConfig(weight_decay=0.0, weight_decay_norm_and_bias=True)


def _sharded_rank(rank: int, world_size: int) -> dict:
    from dist_train.optim.sharded import ShardedOptimizer

    out = {}
    for on in (False, True):
        cfg = OptimConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.1, weight_decay_norm_and_bias=on)
        model = _bn_net()
        opt = build_optimizer(model, cfg, shard=True)
        assert isinstance(opt, ShardedOptimizer)
        out[on] = _decayed_once(model, opt)  # zero gradients: averaged over ranks or not, they stay zero
    return out


def test_sharded_optimizer_decays_the_same_parameters_on_two_ranks():
    for result in run_ranks(_sharded_rank, world_size=2):
        for on, pairs in result.items():
            _expect(pairs, decay_norm_and_bias=on, wd=0.1)


# --- SyncBatchNorm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["train.device=cpu"], ["model.sync_batch_norm=false", "CPU"]),
    (["backend.name=deepspeed"], ["backend.name=ddp"]),
])
def test_sync_batch_norm_is_refused_where_it_cannot_run(overrides, words):
    from dist_train.config import check

    cfg = load_config("configs/demo.yaml", ["model.sync_batch_norm=true", *overrides])
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_sync_batch_norm_on_a_cpu_found_at_run_time_is_a_config_error(tmp_path):
    # train.device=auto passes the check; the run finds no GPU and must say so before building the backend.
    from dist_train.distributed import DistInfo
    from dist_train.train import _parts

    cfg = load_config("configs/demo.yaml", ["model.sync_batch_norm=true", "train.device=auto"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    manifest = {"splits": {"train": {"num_samples": 10}}, "classes": list("abcdefghij"), "image": {"channels": 1}}
    with pytest.raises(ConfigError, match="model.sync_batch_norm=false"):
        _parts(cfg, info, manifest, precision="fp32", checkpointer=None)


def _sync_bn_rank(rank: int, world_size: int):
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).cuda()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    x = torch.randn(8, 3, 6, 6, device="cuda")
    out_plain, out_synced = plain(x), synced(x)
    return (torch.equal(out_plain, out_synced) or torch.allclose(out_plain, out_synced, atol=1e-5),
            torch.allclose(plain[1].running_mean, synced[1].running_mean, atol=1e-6))


@pytest.mark.gpu
def test_sync_batch_norm_on_one_gpu_rank_equals_batch_norm():
    # One NCCL rank: the synced statistics are the local ones, so outputs and running stats agree.
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
    try:
        assert _sync_bn_rank(0, 1) == (True, True)
    finally:
        dist.destroy_process_group()
