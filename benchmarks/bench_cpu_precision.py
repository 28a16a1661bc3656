"""What a CPU gains from channels_last and bf16 autocast: one training step, side by side.

For the demo model (CIFAR ResNet-8, width 16, 1x28x28, batch 64), the study's smoke model (the same at
width 4, whose shortcut convs torch 2.14.1's oneDNN crashes on in channels_last), torchvision resnet18
(batch 8) and resnet50 (batch 4) at 224 px, one forward + backward + SGD step is timed in each of:

  - ``fp32 contiguous``: the default memory format;
  - ``fp32 channels_last``: plain ``model.to(memory_format=torch.channels_last)``; left out for the smoke
    model, where it crashes the process on AVX2 CPUs (docs/cpu.md);
  - ``fp32 channels_last, routed``: what dist_train does (``dist_train.cpu.apply_memory_format``), the
    crashing convs kept in the default layout; the same as the plain one where no conv is routed;
  - ``fp32 channels_last, oneDNN off``: the other way around the crash, for comparison;
  - ``bf16 autocast contiguous``: ``train.precision=bf16`` under DDP on a CPU.

The settings take turns within each round, so machine noise falls on all of them alike; each step runs
on one thread, and both wall and thread CPU time are reported (the ratios use CPU time, which leaves out
time that other jobs hold the core). The ratio column is against ``fp32 contiguous`` of the same model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cpu_precision.py [--rounds 3] [--models demo resnet50]

Prints markdown for docs/performance.md, with the CPU capability torch sees.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_train.cpu import apply_memory_format, cpu_capability, native_bf16
from dist_train.models import build_model

MODELS = {  # name -> (build_model name, in channels, image size, batch, width)
    "demo": ("cifar_resnet8", 1, 28, 64, 16),
    "smoke": ("cifar_resnet8", 1, 28, 64, 4),
    "resnet18": ("resnet18", 3, 224, 8, 16),
    "resnet50": ("resnet50", 3, 224, 4, 16),
}


@dataclass(frozen=True)
class Setting:
    name: str
    channels_last: bool
    bf16: bool
    onednn: bool = True
    routed: bool = False


SETTINGS = (
    Setting("fp32 contiguous", channels_last=False, bf16=False),
    Setting("fp32 channels_last", channels_last=True, bf16=False),
    Setting("fp32 channels_last, routed", channels_last=True, bf16=False, routed=True),
    Setting("fp32 channels_last, oneDNN off", channels_last=True, bf16=False, onednn=False),
    Setting("bf16 autocast contiguous", channels_last=False, bf16=True),
)
CRASHES = {("smoke", "fp32 channels_last")}  # plain channels_last at width 4: SIGBUS/SIGSEGV on AVX2


def _step_fn(model_name: str, setting: Setting):
    name, in_ch, size, batch, width = MODELS[model_name]
    torch.manual_seed(0)
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = build_model(name, num_classes=10, in_channels=in_ch, width=width)
    if setting.routed:
        apply_memory_format(model, channels_last=True, device=torch.device("cpu"))
    else:
        model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, in_ch, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        torch.backends.mkldnn.enabled = setting.onednn  # the backward pass picks its kernel again: cover it
        try:
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if setting.bf16 else contextlib.nullcontext()
            with amp:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.backends.mkldnn.enabled = True

    return step


def bench(model_name: str, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) per step of each setting, after one warm-up step each."""
    steps = {s.name: _step_fn(model_name, s) for s in SETTINGS if (model_name, s.name) not in CRASHES}
    for step in steps.values():
        step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # a rotating order
            wall, cpu = time.perf_counter(), time.thread_time()
            steps[name]()
            times[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, CPU capability "
          f"{cpu_capability()}, native bf16: {native_bf16()}, 1 thread, median of {args.rounds} rounds\n")
    print("| model | batch | setting | wall s/step | CPU s/step | CPU time vs fp32 contiguous |")
    print("|---|---|---|---|---|---|")
    for model_name in args.models:
        result = bench(model_name, args.rounds)
        base = result["fp32 contiguous"][1]
        for name, (wall, cpu) in result.items():
            print(f"| {model_name} | {MODELS[model_name][3]} | {name} | {wall:.3f} | {cpu:.3f} | "
                  f"{cpu / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
