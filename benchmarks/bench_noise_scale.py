"""Overhead of measuring the gradient noise scale, as a fraction of the training step (CPU).

Two setups, each one run with the measurement on and off side by side:

- DDP on 2 gloo ranks: a plain DDP model (built-in all-reduce) against an identical one with
  ``DDPNoiseScaleProbe`` (comm hook with two norms per bucket, one extra scalar all-reduce) and the
  ``GradientNoiseScale`` update.
- One process with gradient accumulation: the same step with and without ``AccumulationNoiseScaleProbe``.

Steps alternate between the two models (ABBA order) so machine noise falls on both alike; the
result is the median over pairs of time(with) / time(without). Random 32x32 data, SGD with momentum.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_noise_scale.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train.models import build_model
from dist_train.noise_scale import (
    AccumulationNoiseScaleProbe,
    DDPNoiseScaleProbe,
    GradientNoiseScale,
    NoiseMeasurement,
    squared_norm,
)


def _batch(micro_batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(micro_batch_size, 3, 32, 32, generator=gen), torch.randint(0, 10, (micro_batch_size,),
                                                                                   generator=gen)


def _interleaved(step_with: Callable[[], float], step_without: Callable[[], float], *, pairs: int,
                 warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        step_with(), step_without()
    ratios, with_s, without_s = [], [], []
    for i in range(pairs):
        if i % 2:
            a, b = step_with(), step_without()
        else:
            b, a = step_without(), step_with()
        ratios.append(a / b)
        with_s.append(a)
        without_s.append(b)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"ratio": statistics.median(ratios), "q1": q1, "q3": q3, "min_ratio": min(with_s) / min(without_s),
            "with_s": statistics.median(with_s), "without_s": statistics.median(without_s)}


def _median_time(fn: Callable[[], None], reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _make_step(model: nn.Module, *, x: torch.Tensor, y: torch.Tensor, accum_steps: int,
               after_micro: Callable[[], None] | None = None, after_backward: Callable[[], None] | None = None,
               synchronise: bool = False) -> Callable[[], float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    is_ddp = isinstance(model, DistributedDataParallel)

    def step() -> float:
        if synchronise:
            dist.barrier()  # both ranks start the timed step together
        start = time.perf_counter()
        for i in range(accum_steps):
            last = i == accum_steps - 1
            with model.no_sync() if is_ddp and not last else contextlib.nullcontext():
                (nn.functional.cross_entropy(model(x), y) / accum_steps).backward()
            if after_micro:
                after_micro()
        if after_backward:
            after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def _ddp_case(rank: int, world_size: int, name: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    base = build_model(name, num_classes=10)
    plain = DistributedDataParallel(copy.deepcopy(base), gradient_as_bucket_view=True)
    probed = DistributedDataParallel(copy.deepcopy(base), gradient_as_bucket_view=True)
    probe = DDPNoiseScaleProbe(probed)
    noise = GradientNoiseScale()
    global_batch = args.micro_batch_size * world_size * args.accum_steps
    x, y = _batch(args.micro_batch_size, seed=rank)
    with_probe = _make_step(probed, x=x, y=y, accum_steps=args.accum_steps, synchronise=True,
                            after_backward=lambda: noise.update(probe.measure(global_batch_size=global_batch)))
    without = _make_step(plain, x=x, y=y, accum_steps=args.accum_steps, synchronise=True)
    out = _interleaved(with_probe, without, pairs=args.pairs, warmup=args.warmup)
    assert noise.grad_sq_norm is not None, "the probe did not run"
    # The added work alone, on this model's gradients: a norm of every bucket before and after the
    # all-reduce, the scalar all-reduce and the estimator update (less exposed to machine noise).
    plain.zero_grad(set_to_none=False)
    (nn.functional.cross_entropy(plain.module(x), y)).backward()
    flat = torch.cat([g.flatten() for g in _grads(plain.module)])

    def added_work() -> None:
        local, reduced = squared_norm(flat), squared_norm(flat)
        dist.all_reduce(local)
        noise.update(NoiseMeasurement(small_sq_norm=local, small_batch_size=1, big_sq_norm=reduced,
                                      big_batch_size=2))

    dist.barrier()
    out["added_s"] = _median_time(added_work)
    return out


def _ddp_worker(rank: int, world_size: int, init_file: str, args: argparse.Namespace, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = {name: _ddp_case(rank, world_size, name, args) for name in args.models}
        if rank == 0:
            results.put(out)
    finally:
        dist.destroy_process_group()


def bench_ddp(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_ddp_worker, args=(r, 2, init_file, args, results)) for r in range(2)]
        for p in procs:
            p.start()
        out = results.get(timeout=600)
        for p in procs:
            p.join()
    return out


def bench_accumulation(args: argparse.Namespace, name: str) -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = build_model(name, num_classes=10)
    plain, probed = copy.deepcopy(base), copy.deepcopy(base)
    probe = AccumulationNoiseScaleProbe(probed.parameters())
    noise = GradientNoiseScale()
    x, y = _batch(args.micro_batch_size, seed=0)
    accum = max(2, args.accum_steps)
    with_probe = _make_step(probed, x=x, y=y, accum_steps=accum, after_micro=probe.after_micro_backward,
                            after_backward=lambda: noise.update(probe.measure(micro_batch_size=args.micro_batch_size)))
    without = _make_step(plain, x=x, y=y, accum_steps=accum)
    out = _interleaved(with_probe, without, pairs=args.pairs, warmup=args.warmup)
    nn.functional.cross_entropy(plain(x), y).backward()
    grads = _grads(plain)

    def added_work() -> None:  # per-parameter norms in each micro-step's hooks, the final norm, the update
        micro = [torch.stack([squared_norm(g) for g in grads]).sum() for _ in range(accum)]
        big = torch.stack([squared_norm(g) for g in grads]).sum()
        noise.update(NoiseMeasurement(small_sq_norm=torch.stack(micro).mean(), small_batch_size=1,
                                      big_sq_norm=big, big_batch_size=2))

    out["added_s"] = _median_time(added_work)
    return out


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "resnet18"])
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--accum-steps", type=int, default=1, help="DDP accumulation steps (>= 2 single-process)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    print(f"machine: {_machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| setup | model | step without (s) | step with (s) | median ratio (IQR) | overhead | min/min "
          "| added work alone |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(f"DDP 2 gloo ranks, micro {args.micro_batch_size}, accum {args.accum_steps}", name, r)
            for name, r in bench_ddp(args).items()]
    accum = max(2, args.accum_steps)
    rows += [(f"1 process, micro {args.micro_batch_size}, accum {accum}", name, bench_accumulation(args, name))
             for name in args.models]
    for setup, name, r in rows:
        print(f"| {setup} | {name} | {r['without_s']:.3f} | {r['with_s']:.3f} | {r['ratio']:.3f} "
              f"({r['q1']:.3f}-{r['q3']:.3f}) | {100 * (r['ratio'] - 1):+.1f}% | {r['min_ratio']:.3f} "
              f"| {1e3 * r['added_s']:.1f} ms = {100 * r['added_s'] / r['without_s']:.1f}% |")
    print(f"\nmedians over {args.pairs} interleaved pairs after {args.warmup} warm-up pairs; "
          "min/min: fastest step with over fastest without; added work alone: median of 20 timings, "
          "as % of the median step without")


if __name__ == "__main__":
    main()
