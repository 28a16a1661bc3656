"""Ghost batch norm (``model.bn_batch_size``): each chunk of a batch is normalised as BatchNorm would
normalise that chunk alone, and the running statistics take the chunks' average once per forward."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dist_train.config import ConfigError, check, load_config
from dist_train.models import GhostBatchNorm2d, build_model, use_ghost_batch_norm


def _pair(channels: int = 3, ghost: int = 4):
    torch.manual_seed(0)
    ghost_bn = GhostBatchNorm2d(channels, ghost)
    with torch.no_grad():
        ghost_bn.weight.uniform_(0.5, 1.5)
        ghost_bn.bias.uniform_(-0.5, 0.5)
    return ghost_bn


@pytest.mark.parametrize("channels_last", [False, True])
def test_each_chunk_is_normalised_as_batch_norm_over_that_chunk(channels_last):
    ghost_bn = _pair()
    x = torch.randn(12, 3, 5, 5) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = ghost_bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out.square().sum().backward()
    for i in range(3):
        chunk = x.detach()[4 * i:4 * i + 4].clone().requires_grad_(True)
        reference = nn.BatchNorm2d(3)
        reference.load_state_dict({k: v for k, v in ghost_bn.state_dict().items()}, strict=False)
        with torch.no_grad():
            reference.weight.copy_(ghost_bn.weight)
            reference.bias.copy_(ghost_bn.bias)
        expected = reference(chunk)
        torch.testing.assert_close(out[4 * i:4 * i + 4], expected, rtol=1e-5, atol=1e-5)
        expected.square().sum().backward()
        torch.testing.assert_close(x.grad[4 * i:4 * i + 4], chunk.grad, rtol=1e-4, atol=1e-5)


def test_running_statistics_take_the_mean_over_chunks_once_per_forward():
    ghost_bn = _pair(ghost=4)
    x = torch.randn(8, 3, 2, 2) * 2 + 3
    ghost_bn(x)
    chunks = x.reshape(2, 4, 3, 2, 2)
    means = chunks.mean(dim=(1, 3, 4))                       # (chunks, C)
    variances = chunks.var(dim=(1, 3, 4), unbiased=True)     # unbiased, as BatchNorm's running_var
    torch.testing.assert_close(ghost_bn.running_mean, 0.9 * torch.zeros(3) + 0.1 * means.mean(0))
    torch.testing.assert_close(ghost_bn.running_var, 0.9 * torch.ones(3) + 0.1 * variances.mean(0))
    assert int(ghost_bn.num_batches_tracked) == 1


def test_eval_mode_is_batch_norm_with_the_running_statistics():
    ghost_bn = _pair()
    ghost_bn(torch.randn(8, 3, 4, 4))
    ghost_bn.eval()
    reference = nn.BatchNorm2d(3).eval()
    reference.load_state_dict(ghost_bn.state_dict())
    x = torch.randn(5, 3, 4, 4)  # any batch size in eval
    torch.testing.assert_close(ghost_bn(x), reference(x))


def test_a_batch_that_does_not_split_is_an_error():
    with pytest.raises(ValueError, match="model.bn_batch_size"):
        _pair(ghost=4)(torch.randn(6, 3, 2, 2))


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet20"])
def test_every_batch_norm_of_a_model_is_replaced_and_the_keys_stay(name):
    model = build_model(name, num_classes=10, in_channels=3)
    keys = list(model.state_dict())
    count = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    use_ghost_batch_norm(model, 4)
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, GhostBatchNorm2d) for m in model.modules()) == count > 0
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    model(torch.randn(8, 3, 32, 32)).sum().backward()  # trains


def test_a_model_with_one_ghost_batch_equals_the_plain_model():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    ghost = use_ghost_batch_norm(torchvision.models.resnet18(num_classes=10), 8)
    ghost.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(ghost(x), plain(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides, words", [
    (["model.bn_batch_size=64", "train.micro_batch_size=32"], ["larger than train.micro_batch_size=32"]),
    (["model.bn_batch_size=12", "train.micro_batch_size=32"], ["does not divide", "e.g. 8"]),
])
def test_the_config_refuses_ghost_batches_that_do_not_fit(overrides, words):
    with pytest.raises(ConfigError) as err:
        check(load_config("configs/demo.yaml", overrides))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_ghost_batch_norm_and_sync_batch_norm_contradict():
    with pytest.raises(ConfigError, match="contradict"):
        load_config("configs/demo.yaml", ["model.bn_batch_size=8", "model.sync_batch_norm=true"])
