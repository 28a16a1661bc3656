"""The optimizer factory: config checks, parameter groups, torch's SGD/AdamW, hyperparameters, state size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_train.optim import (
    LookaheadConfig,
    OptimConfig,
    build_optimizer,
    optimizer_state_bytes,
    param_groups,
    set_hyperparams,
)
from dist_train.optim.lookahead import Lookahead
from dist_train.optim.qhm import QHM
from dist_train.optim.radam import RAdam


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))


def test_weight_decay_skips_biases_and_normalisation_weights():
    model = _model()
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = param_groups(model, weight_decay=0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[4].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[1].bias), id(model[3].weight),
                                                   id(model[3].bias), id(model[4].bias)}


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("radam", RAdam),
                                      ("qhm", QHM)])
def test_names_build_their_optimizer_with_the_config_settings(name, cls):
    cfg = OptimConfig(name=name, lr=0.02, momentum=0.8, decoupled_weight_decay=name == "adamw", weight_decay=0.1)
    opt = build_optimizer(_model(), cfg)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.02 for g in opt.param_groups)
    wrapped = build_optimizer(_model(), OptimConfig(name=name, decoupled_weight_decay=name == "adamw",
                                                    lookahead=LookaheadConfig(k=3, alpha=0.4)))
    assert isinstance(wrapped, Lookahead) and type(wrapped.inner) is cls
    assert all(g["lookahead_k"] == 3 and g["lookahead_alpha"] == 0.4 for g in wrapped.param_groups)


def test_shard_without_a_process_group_builds_the_plain_optimizer():
    assert type(build_optimizer(_model(), OptimConfig(name="radam"), shard=True)) is RAdam


@pytest.mark.parametrize("kwargs,field", [
    (dict(name="sgd", decoupled_weight_decay=True), "decoupled_weight_decay"),
    (dict(name="adamw"), "decoupled_weight_decay"),
    (dict(name="radam", nesterov=True), "nesterov"),
    (dict(qhm_nu=1.5), "qhm_nu"),
    (dict(eps=0.0), "eps"),
    (dict(lr=0.0), "lr"),
    (dict(momentum=1.0), "momentum"),
])
def test_config_rejects_impossible_settings_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs)
    OptimConfig(name="adamw", weight_decay=0.0)  # nothing to decouple: fine


def test_sgd_set_hyperparams_mid_run_follows_the_formula():
    """torch SGD: b = m b + g (b_1 = g_1); theta -= lr b, with lr and m changed at step 6."""
    rng = np.random.default_rng(1)
    theta0, grads = rng.normal(size=4), [rng.normal(size=4) for _ in range(12)]
    schedule = [(0.1, 0.9)] * 5 + [(0.02, 0.5)] * 7
    p = torch.nn.Parameter(torch.tensor(theta0))
    opt = build_optimizer(torch.nn.ParameterList([p]), OptimConfig(name="sgd", weight_decay=0.0))
    theta, b = theta0.copy(), None
    for (lr, m), g in zip(schedule, grads):
        set_hyperparams(opt, lr=lr, momentum=m)
        p.grad = torch.tensor(g)
        opt.step()
        b = g if b is None else m * b + g
        theta = theta - lr * b
    np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-12)


def test_adamw_set_hyperparams_sets_beta1():
    opt = build_optimizer(_model(), OptimConfig(name="adamw", decoupled_weight_decay=True))
    set_hyperparams(opt, lr=0.5, momentum=0.3)
    assert all(g["betas"] == (0.3, 0.999) and g["lr"] == 0.5 for g in opt.param_groups)
    with pytest.raises(ValueError):
        set_hyperparams(opt, lr=0.5, momentum=1.0)


@pytest.mark.parametrize("name,lookahead,copies", [("radam", False, 2), ("radam", True, 3), ("qhm", False, 1),
                                                   ("sgd", True, 2)])
def test_state_bytes_counts_every_state_tensor(name, lookahead, copies):
    model = _model()
    opt = build_optimizer(model, OptimConfig(name=name, lookahead=LookaheadConfig() if lookahead else None))
    assert optimizer_state_bytes(opt) == 0
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    opt.step()
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert optimizer_state_bytes(opt) == copies * n_bytes


def test_one_table_holds_the_facts_of_every_optimizer_the_config_can_name():
    import typing

    import torch

    from dist_train.optim.config import OptimConfig
    from dist_train.optim_info import OPTIMIZERS
    from dist_train.schedule import optimizer_family

    names = typing.get_args(typing.get_type_hints(OptimConfig)["name"])
    assert sorted(names) == sorted(OPTIMIZERS)  # the config's choices are the table's rows
    model = torch.nn.Linear(3, 2)
    for name, info in OPTIMIZERS.items():
        decoupled = info.weight_decay == "decoupled"
        built = build_optimizer(model, OptimConfig(name=name, decoupled_weight_decay=decoupled))
        assert isinstance(built, torch.optim.Optimizer), name
        assert optimizer_family(name) == info.family
        if info.weight_decay == "l2":
            with pytest.raises(ValueError, match="L2 weight decay only"):
                OptimConfig(name=name, decoupled_weight_decay=True)
        if not info.nesterov:
            with pytest.raises(ValueError, match="nesterov applies to sgd only"):
                OptimConfig(name=name, nesterov=True, decoupled_weight_decay=decoupled)
