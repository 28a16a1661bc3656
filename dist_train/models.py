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


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from fixed-size chunks ("ghost batches") of each batch.

    In training mode the batch is cut into consecutive chunks of ``ghost_batch_size`` samples, and each chunk
    is normalised with its own mean and (biased) variance, exactly as ``nn.BatchNorm2d`` would normalise that
    chunk alone. The running statistics are updated once per forward, with the mean over chunks of each
    chunk's mean and unbiased variance: as if each chunk were one worker of Goyal et al.'s setup (32 images
    per BN) and their running statistics were averaged. In eval mode it is ``nn.BatchNorm2d``.

    Why not upstream: torch has no ghost batch norm; looping ``F.batch_norm`` over the chunks would update the
    running statistics once per chunk (their momentum compounding k times per step). The chunk statistics here
    are computed in one vectorised pass over a (chunks, samples, C, pixels) view.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size={ghost_batch_size} must be >= 1")
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c = x.shape[:2]
        if n % self.ghost_batch_size:
            raise ValueError(f"a batch of {n} samples does not split into ghost batches of {self.ghost_batch_size}; "
                             "set model.bn_batch_size to a divisor of train.micro_batch_size")
        chunks = x.reshape(n // self.ghost_batch_size, self.ghost_batch_size, c, -1)
        var, mean = torch.var_mean(chunks, dim=(1, 3), correction=0, keepdim=True)
        out = (chunks - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.view(1, 1, c, 1) + self.bias.view(1, 1, c, 1)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                per_chunk = chunks.shape[1] * chunks.shape[3]
                momentum: float | torch.Tensor = self.momentum if self.momentum is not None else 0.1
                if self.momentum is None and self.num_batches_tracked is not None:  # a cumulative average
                    momentum = (self.num_batches_tracked + 1).reciprocal().to(self.running_mean.dtype)
                unbiased = var.reshape(-1, c).mean(0) * per_chunk / max(per_chunk - 1, 1)
                self.running_mean.lerp_(mean.reshape(-1, c).mean(0).to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        return out.reshape(x.shape).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def use_ghost_batch_norm(model: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` in place by a ``GhostBatchNorm2d`` with the same
    parameters and buffers (``model.bn_batch_size``); the state dict keys stay the same."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            ghost = GhostBatchNorm2d(child.num_features, ghost_batch_size, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            ghost.load_state_dict(child.state_dict())
            ghost.to(device=child.weight.device if child.affine else None)
            setattr(model, name, ghost)
        else:
            use_ghost_batch_norm(child, ghost_batch_size)
    return model
