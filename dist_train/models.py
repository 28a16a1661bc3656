"""Models by name: torchvision ResNets, and a CIFAR-style ResNet for 28-32 px inputs."""

from __future__ import annotations

import torch
from torch import nn


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s 6n+2-layer ResNet for small images: three stages of n blocks, widths w, 2w, 4w.

    ``zero_init_residual`` starts the last BN's weight of every block at 0, as torchvision's option of that
    name does for its ResNets: each block then begins as relu(shortcut(x))."""

    def __init__(self, depth: int, *, num_classes: int, in_channels: int, width: int = 16,
                 zero_init_residual: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (8, 20, 32, 56, ...), not {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, ch = [], width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(_BasicBlock(ch, out_ch, stride=2 if stage > 0 and i == 0 else 1))
                ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for block in blocks:
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, *, num_classes: int, in_channels: int = 3, width: int = 16,
                zero_init_residual: bool = False) -> nn.Module:
    """A freshly initialised model. Raises ValueError naming the valid choices for an unknown name.

    ``zero_init_residual`` zeroes the last BN weight (gamma) of each residual block (``model.zero_init_residual``)."""
    if name.startswith("cifar_resnet") and name[len("cifar_resnet"):].isdigit():
        return CifarResNet(int(name[len("cifar_resnet"):]), num_classes=num_classes, in_channels=in_channels,
                           width=width, zero_init_residual=zero_init_residual)
    if name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes,
                                                  zero_init_residual=zero_init_residual)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model
    raise ValueError(f"model.name={name!r} is not known; use resnet18, resnet34, resnet50, resnet101 "
                     f"or cifar_resnet<6n+2> such as cifar_resnet20")


def compile_in_place(model: nn.Module) -> nn.Module:
    """``torch.compile`` the model's forward in place (``nn.Module.compile``), before any backend wraps it.

    In place, not ``torch.compile(model)``: that returns an ``OptimizedModule`` whose state_dict keys carry an
    ``_orig_mod.`` prefix, which checkpoints, ``export`` and other tools would then see. The backward is
    compiled with the forward (AOTAutograd); DDP's gradient hooks and the noise-scale probes' tensor hooks sit
    on the parameters and fire as in eager mode. The first steps (and the first evaluation, which changes
    BatchNorm's mode) pay the compile; docs/performance.md has what it buys on CPU."""
    model.compile()
    return model
