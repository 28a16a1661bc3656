"""What ``model.compile`` (torch.compile, inductor) buys on a CPU: one training step, eager beside compiled.

For cifar_resnet20 (1x28x28, micro-batch 32, the demo's input) and torchvision resnet18 (3x64x64, micro-batch
16), one forward + backward + SGD step is timed for the eager model and for the same model compiled in place
(``dist_train.models.compile_in_place``). The two take turns within each round, so machine noise falls on
both alike; thread CPU time is what the ratio uses (wall time is reported too). The compile itself (the
first step) is reported apart.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compile.py [--rounds 5] [--steps 10]

Prints markdown for docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dist_train.cpu import cpu_capability
from dist_train.models import build_model, compile_in_place

MODELS = {"cifar_resnet20": ("cifar_resnet20", 1, 28, 32), "resnet18": ("resnet18", 3, 64, 16)}


def _step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _timed(fn, steps: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, CPU capability "
          f"{cpu_capability()}, 1 thread, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}\n")
    print("| model | eager ms/step | compiled ms/step | compiled / eager (CPU time) | first compiled step (compile) s |")
    print("|---|---|---|---|---|")
    for name, (model_name, channels, size, batch) in MODELS.items():
        torch.manual_seed(0)
        eager = build_model(model_name, num_classes=10, in_channels=channels)
        compiled = compile_in_place(copy.deepcopy(eager))
        x, y = torch.randn(batch, channels, size, size), torch.randint(0, 10, (batch,))
        opts = {m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (eager, compiled)}
        tic = time.perf_counter()
        _step(compiled, opts[compiled], x, y)
        compile_s = time.perf_counter() - tic
        _step(eager, opts[eager], x, y)
        times: dict[str, list[tuple[float, float]]] = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for label, model in (("eager", eager), ("compiled", compiled)):
                times[label].append(_timed(lambda m=model: _step(m, opts[m], x, y), args.steps))
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
        print(f"| {name} ({channels}x{size}x{size}, batch {batch}) | {med['eager'][0] * 1e3:.1f} | "
              f"{med['compiled'][0] * 1e3:.1f} | {med['compiled'][1] / med['eager'][1]:.2f}x | {compile_s:.1f} |")


if __name__ == "__main__":
    main()
