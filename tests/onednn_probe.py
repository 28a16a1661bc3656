"""Runs convolutions that torch 2.14.1's oneDNN crashes on (AVX2 CPUs), in a process of its own.

    python tests/onednn_probe.py raw        # the upstream reproducer, exactly as reported: may crash
    python tests/onednn_probe.py routed     # the same, through dist_train.cpu.apply_memory_format
    python tests/onednn_probe.py grid [--threads N] [--quick]
        # every 1x1 stride-2 conv with 1-16 channels in and out and every cifar_resnet8 of width 1-8,
        # at batches 1-64, in fp32 and bf16 autocast, as dist_train sets them up (channels_last on CPU)

Exit status 0 and ``ok`` means every case ran; memory corruption shows as a signal (bus error,
segfault, abort) or a hang, which the calling test sees. In fp32 each result is also compared with the
default layout's (a conv's gradients too), so corruption that does not crash fails as well. docs/cpu.md
tells the story.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys

import torch
from torch import nn

from dist_train.cpu import apply_memory_format
from dist_train.models import build_model

CPU = torch.device("cpu")


def reproducer(*, routed: bool) -> None:
    conv = nn.Conv2d(4, 8, kernel_size=1, stride=2, bias=False)
    if routed:
        apply_memory_format(conv, channels_last=True, device=CPU)
    else:
        conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(64, 4, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(5):
        conv(x).sum().backward()


def _run(model: nn.Module, x: torch.Tensor, *, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output, and the gradients of input and parameters under a fixed random upstream gradient."""
    x = x.detach().requires_grad_()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        y = model(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last if y.dim() == 4 else torch.contiguous_format)
    (y.float() * upstream).sum().backward()
    return y.detach().float(), [x.grad, *(p.grad for p in model.parameters())]


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference, relative to the largest entry: float32 in another summation order gives ~1e-6."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def check(make_model, shape: tuple[int, ...], *, bf16: bool, compare_grads: bool) -> None:
    """``make_model()`` set up as dist_train does (channels_last on CPU) against the default layout.

    Every output and gradient must be finite, and in fp32 the output must match the default layout's.
    ``compare_grads`` also holds the gradients to it: right for one layer, not for a whole ResNet in
    train mode, where a few ReLUs that flip on 1e-7 changes of their input spread through BatchNorm's
    backward (a width-1 ResNet's gradients differ by up to 100% between two float32 layouts)."""
    torch.manual_seed(0)
    routed, reference = make_model(), make_model()
    reference.load_state_dict(routed.state_dict())
    fmt = apply_memory_format(routed, channels_last=True, device=CPU)
    x = torch.randn(shape)
    y, grads = _run(routed, x.contiguous(memory_format=fmt), bf16=bf16)
    name = f"{make_model.__name__}{shape}{' bf16' if bf16 else ''}"
    if not all(bool(t.isfinite().all()) for t in (y, *grads)):
        sys.exit(f"{name}: a non-finite output or gradient")
    if bf16:
        return  # bf16 rounds differently per layout; the point is that it runs
    y_ref, grads_ref = _run(reference, x, bf16=False)
    errors = [_error(y, y_ref), *(_error(g, w) for g, w in zip(grads, grads_ref) if compare_grads)]
    if max(errors) > 1e-4:
        sys.exit(f"{name}: differs from the default layout's result by {max(errors):.3g} of its largest entry")


def grid(*, quick: bool) -> int:
    batches = (1, 2, 64) if quick else (1, 2, 3, 5, 8, 16, 33, 64)
    cases = 0
    for cin, cout in itertools.product(range(1, 17), range(1, 17)):
        def conv(cin=cin, cout=cout):
            return nn.Conv2d(cin, cout, kernel_size=1, stride=2, bias=False)
        for batch, size, bf16 in itertools.product(batches, (28, 14), (False, True)):
            if size == 14 and batch != 64:
                continue
            check(conv, (batch, cin, size, size), bf16=bf16, compare_grads=True)
            cases += 1
    for width, (channels, size) in itertools.product(range(1, 9), ((1, 28), (3, 32))):
        def resnet(width=width, channels=channels):
            return build_model("cifar_resnet8", num_classes=10, in_channels=channels, width=width)
        for batch, bf16 in itertools.product((1, 2, 7, 64) if not quick else (2, 64), (False, True)):
            check(resnet, (batch, channels, size, size), bf16=bf16, compare_grads=False)
            cases += 1
    return cases


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("raw", "routed", "grid"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="fewer batches")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "grid":
        print(f"ok: {grid(quick=args.quick)} cases")
    else:
        reproducer(routed=args.what == "routed")
        print("ok")


if __name__ == "__main__":
    main()
