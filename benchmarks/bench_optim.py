"""Optimizer step time and state memory on ResNet-50's parameters (CPU, random gradients).

Compares, in one run and interleaved: our RAdam, Lookahead(our RAdam), torch.optim.RAdam(foreach=True)
and torch.optim.RAdam(foreach=False). Then measures the sharded state per rank on 2 gloo ranks, and the
shard imbalance of our element partition against greedy whole-parameter bins (ZeroRedundancyOptimizer's).

``--whole-step`` then times the whole DDP step on 2 gloo ranks (forward, backward with its communication, the
gradient norm, the optimizer step and the all-gather) for resnet18 and resnet50, unsharded against the
sharded optimizer's two gradient paths (all_reduce, reduce_scatter), taking turns within each round; and the
collectives alone on a ResNet-50-sized tensor. Wall time: the communication runs on gloo's threads.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_optim.py

Step times are per step, averaged over one Lookahead cycle (k=5 steps, so its sync is included at its
real rate), then the median over rounds; the optimizers take turns within each round, in a rotating
order, so that machine noise falls on all of them alike. Each step runs on one thread, so the thread's
CPU time is reported beside wall time: on a shared machine it leaves out the time other jobs hold the
core, and the ratios are taken from it. Results are printed as markdown for docs/optimizers.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from dist_train.optim import LookaheadConfig, OptimConfig, build_optimizer, optimizer_state_bytes, param_groups
from dist_train.optim.lookahead import Lookahead
from dist_train.optim.radam import RAdam
from dist_train.optim.sharded import partition

LR, BETAS, WEIGHT_DECAY, K = 1e-3, (0.9, 0.999), 5e-5, 5


def _resnet50_params(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return model


def _candidates(models: list[torch.nn.Module]) -> dict[str, torch.optim.Optimizer]:
    def groups(i: int) -> list[dict]:
        return param_groups(models[i], weight_decay=WEIGHT_DECAY)

    kwargs = dict(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    return {
        "ours RAdam": RAdam(groups(0), **kwargs),
        "Lookahead(ours RAdam)": Lookahead(RAdam(groups(1), **kwargs), k=K, alpha=0.5),
        "torch RAdam foreach=True": torch.optim.RAdam(groups(2), foreach=True, **kwargs),
        "torch RAdam foreach=False": torch.optim.RAdam(groups(3), foreach=False, **kwargs),
    }


def bench_steps(rounds: int) -> None:
    models = [_resnet50_params() for _ in range(4)]
    optimizers = _candidates(models)
    for opt in optimizers.values():  # past RAdam's rho_t switch (step 6), and state allocated
        for _ in range(2 * K):
            opt.step()
    wall: dict[str, list[float]] = {name: [] for name in optimizers}
    cpu: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(K):
                optimizers[name].step()
            cpu[name].append((time.thread_time() - start_cpu) / K)
            wall[name].append((time.perf_counter() - start_wall) / K)
    base = "torch RAdam foreach=True"
    base_cpu, base_wall = statistics.median(cpu[base]), statistics.median(wall[base])
    base_bytes = optimizer_state_bytes(optimizers[base])
    n_params = sum(p.numel() for p in models[0].parameters())
    print(f"\nResNet-50: {n_params / 1e6:.2f}M parameters, {rounds} rounds x {K} steps, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("| optimizer | CPU ms/step | vs torch foreach | wall ms/step (min..max) | vs torch foreach | "
          "state MiB | vs torch foreach |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        c, w, state = statistics.median(cpu[name]), statistics.median(wall[name]), optimizer_state_bytes(optimizers[name])
        print(f"| {name} | {c * 1e3:.1f} | {c / base_cpu:.3f}x | {w * 1e3:.1f} ({min(wall[name]) * 1e3:.0f}.."
              f"{max(wall[name]) * 1e3:.0f}) | {w / base_wall:.3f}x | {state / 2**20:.1f} | {state / base_bytes:.3f}x |")


def shard_imbalance() -> None:
    """Largest shard over the mean shard, ours and greedy whole-parameter bins, for ResNet-50's groups."""
    model = torchvision.models.resnet50()
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model, weight_decay=WEIGHT_DECAY)]
    total = sum(map(sum, groups))
    print("\n| world size | ours: max/mean shard | ours: max-min elements | greedy whole params: max/mean | "
          "greedy: max-min elements |")
    print("|---|---|---|---|---|")
    for world_size in (2, 4, 8, 16):
        _, layout = partition([n for g in groups for n in g], world_size)
        ours = [sum(pc.stop - pc.start for pc in pieces) for pieces in layout]
        greedy = [0] * world_size
        for group in groups:  # torch's ZeroRedundancyOptimizer: per group, largest first, to the lightest rank
            for numel in sorted(group, reverse=True):
                greedy[greedy.index(min(greedy))] += numel
        mean = total / world_size
        print(f"| {world_size} | {max(ours) / mean:.6f} | {max(ours) - min(ours)} | {max(greedy) / mean:.4f} | "
              f"{max(greedy) - min(greedy)} |")


def _sharded_rank(rank: int, world_size: int, init_file: str, steps: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = {}
        for label, lookahead in (("RAdam", None), ("Lookahead(RAdam)", LookaheadConfig(k=K))):
            model = _resnet50_params()
            opt = build_optimizer(model, OptimConfig(name="radam", lr=LR, weight_decay=WEIGHT_DECAY,
                                                     lookahead=lookahead), shard=True)
            opt.step()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
            out[label] = (optimizer_state_bytes(opt), statistics.median(times))
            del model, opt
        results[rank] = out
    finally:
        dist.destroy_process_group()


def bench_sharded(steps: int) -> None:
    unsharded = {}
    for label, lookahead in (("RAdam", None), ("Lookahead(RAdam)", LookaheadConfig(k=K))):
        model = _resnet50_params()
        opt = build_optimizer(model, OptimConfig(name="radam", lr=LR, weight_decay=WEIGHT_DECAY, lookahead=lookahead))
        opt.step()
        unsharded[label] = optimizer_state_bytes(opt)
        del model, opt
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sharded_rank, args=(2, os.path.join(tmp, "store"), steps, results), nprocs=2)
        results = dict(results)
    print("\n| sharded, 2 gloo ranks | unsharded state MiB | rank 0 MiB | rank 1 MiB | max rank / unsharded | "
          "step ms rank 0 (incl. all_gather) |")
    print("|---|---|---|---|---|---|")
    for label, full in unsharded.items():
        per_rank = [results[r][label][0] for r in range(2)]
        print(f"| {label} | {full / 2**20:.1f} | {per_rank[0] / 2**20:.1f} | {per_rank[1] / 2**20:.1f} | "
              f"{max(per_rank) / full:.4f} | {results[0][label][1] * 1e3:.0f} |")


WHOLE_STEP_MODELS = {"resnet18": 64, "resnet50": 64}  # image side: small, so a round stays short on a CPU
WHOLE_STEP_MICRO = 32
LAYOUTS = {"unsharded": (False, "auto"), "sharded, all_reduce": (True, "all_reduce"),
           "sharded, reduce_scatter": (True, "reduce_scatter")}


def _bytes_sent(layout: str, numel: int, world_size: int, elem: int = 4) -> float:
    """Bytes each rank sends per step for the parameters' gradients and weights (ring algorithms)."""
    part = (world_size - 1) / world_size * numel * elem
    return {"unsharded": 2 * part, "sharded, all_reduce": 3 * part, "sharded, reduce_scatter": 2 * part}[layout]


def _whole_step_rank(rank: int, world_size: int, init_file: str, rounds: int, results: dict) -> None:
    import torch.nn.functional as F

    from dist_train.backends import build_backend
    from dist_train.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size,
                    device=torch.device("cpu"))
    cfg = OptimConfig(name="radam", lr=LR, weight_decay=WEIGHT_DECAY)
    try:
        out: dict = {}
        n = 25_557_032 // world_size * world_size  # the collectives alone, on ResNet-50's parameter count
        x, shard, full = torch.randn(n), torch.empty(n // world_size), torch.empty(n)
        collectives = {"all_reduce": lambda: dist.all_reduce(x),
                       "reduce_scatter_single": lambda: dist.reduce_scatter_single(shard, x),
                       "all_gather_single": lambda: dist.all_gather_single(full, shard)}
        coll_times: dict[str, list[float]] = {k: [] for k in collectives}
        for r in range(rounds + 1):
            for name, fn in collectives.items():
                dist.barrier()
                start = time.perf_counter()
                fn()
                if r:
                    coll_times[name].append(time.perf_counter() - start)
        out["collectives"] = {k: statistics.median(v) for k, v in coll_times.items()}
        for model_name, side in WHOLE_STEP_MODELS.items():
            g = torch.Generator().manual_seed(rank)
            images = torch.randn(WHOLE_STEP_MICRO, 3, side, side, generator=g)
            labels = torch.randint(0, 1000, (WHOLE_STEP_MICRO,), generator=g)
            backends = {}
            for label, (shard_state, reduction) in LAYOUTS.items():
                torch.manual_seed(0)
                backend = build_backend("ddp", info, micro_batch_size=WHOLE_STEP_MICRO,
                                        **({"sharded_reduction": reduction} if shard_state else {}))
                backend.setup(getattr(torchvision.models, model_name)(),
                              lambda m, s=shard_state: build_optimizer(m, cfg, shard=s))
                backend.set_global_batch_size(WHOLE_STEP_MICRO * world_size)
                backends[label] = backend

            def step(backend) -> None:
                with backend.grad_sync(True):
                    loss = F.cross_entropy(backend.model(images), labels)
                    backend.backward(loss)
                backend.grads_finite()
                backend.optimizer_step()

            times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
            for backend in backends.values():  # warm-up: state allocated, buckets rebuilt
                step(backend)
                step(backend)
            names = list(LAYOUTS)
            for r in range(rounds):
                for label in names[r % len(names):] + names[:r % len(names)]:
                    dist.barrier()
                    start = time.perf_counter()
                    step(backends[label])
                    times[label].append(time.perf_counter() - start)
            numel = sum(p.numel() for p in backends["unsharded"].module.parameters())
            out[model_name] = {"numel": numel, "state": {k: optimizer_state_bytes(b.optimizer)
                                                         for k, b in backends.items()},
                               "times": times}
            del backends
        results[rank] = out
    finally:
        dist.destroy_process_group()


def bench_whole_step(rounds: int, world_size: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_whole_step_rank, args=(world_size, os.path.join(tmp, "store"), rounds, results), nprocs=world_size)
        results = dict(results)
    coll = results[0]["collectives"]
    print(f"\nCollectives alone, {world_size} gloo ranks, 25.56M float32 (ResNet-50's parameters), median of "
          f"{rounds}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in coll.items()))
    print(f"\nWhole step, {world_size} gloo ranks x 1 thread, micro-batch {WHOLE_STEP_MICRO} per rank, RAdam, "
          f"median over {rounds} rounds (wall, rank 0):\n")
    print("| model | layout | ms/step (min..max) | vs unsharded | state per rank MiB | vs unsharded | "
          "MiB sent per rank per step |")
    print("|---|---|---|---|---|---|---|")
    for model_name, side in WHOLE_STEP_MODELS.items():
        r0 = results[0][model_name]
        base = statistics.median(r0["times"]["unsharded"])
        base_state = r0["state"]["unsharded"]
        for label in LAYOUTS:
            t = r0["times"][label]
            state = max(results[r][model_name]["state"][label] for r in results)
            print(f"| {model_name} @ {side}px | {label} | {statistics.median(t) * 1e3:.0f} ({min(t) * 1e3:.0f}.."
                  f"{max(t) * 1e3:.0f}) | {statistics.median(t) / base:.3f}x | {state / 2**20:.1f} | "
                  f"{state / base_state:.3f}x | {_bytes_sent(label, r0['numel'], world_size) / 2**20:.1f} |")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of one k-cycle per optimizer")
    parser.add_argument("--sharded-steps", type=int, default=3, help="timed steps per rank in the sharded run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    parser.add_argument("--whole-step", type=int, default=0, metavar="ROUNDS",
                        help="also time the whole DDP step, unsharded against sharded, over this many rounds")
    parser.add_argument("--only-whole-step", action="store_true", help="skip the optimizer-only measurements")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}")
    if args.whole_step:
        bench_whole_step(args.whole_step)
    if args.only_whole_step:
        return
    bench_steps(args.rounds)
    shard_imbalance()
    bench_sharded(args.sharded_steps)


if __name__ == "__main__":
    main()
