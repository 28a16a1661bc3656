"""What dist_train's step costs beyond a bare PyTorch loop: the same model, batch and data, side by side.

For cifar_resnet20 (1x28x28) and torchvision resnet18 (3x64x64), at micro-batch 32, one whole optimizer step
(forward, backward with DDP's all-reduce, SGD with momentum) is timed two ways, taking turns within each round:

  - ``bare``: ``DistributedDataParallel(model)``, ``F.cross_entropy``, ``backward``, ``optimizer.step`` and
    ``zero_grad`` over micro-batches already on the device;
  - ``dist_train``: ``Trainer.train_step`` over the same micro-batches (as uint8 images, normalised on the
    device as the loader's output is): the schedule's hyperparameters, the metric window, the step flags'
    all-reduce and host read, the finiteness check and the gradient norm included.

With ``--noise`` the dist_train step also measures the gradient noise scale. Runs on 1 process and on
2 gloo ranks (one thread each); the ratio is dist_train / bare of rank 0's thread CPU time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_overhead.py [--rounds 5] [--steps 5]

Prints markdown for docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dist_train.backends import build_backend
from dist_train.checkpoint import Checkpointer
from dist_train.config import TrainConfig
from dist_train.distributed import DistInfo
from dist_train.models import build_model
from dist_train.optim import OptimConfig, build_optimizer, set_hyperparams
from dist_train.parts import TrainerParts
from dist_train.trainer import Normalise, Trainer

MODELS = {"cifar_resnet20": ("cifar_resnet20", 1, 28), "resnet18": ("resnet18", 3, 64)}
MICRO = 32
SGD = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)


class _Constant:
    def __init__(self, batch: int):
        self.batch = batch

    def state_at(self, samples_seen: int, *, global_batch_size: int | None = None):
        return SimpleNamespace(lr=0.05, momentum=0.9, global_batch_size=self.batch, noise_scale=float("nan"),
                               epoch=0.0, milestones_passed=0)


class _Repeat:
    """The same micro-batch again and again (a Stateful stream of no state)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _trainer(model_name: str, info: DistInfo, images: torch.Tensor, labels: torch.Tensor, *, noise: bool):
    from dist_train.noise_scale import GradientNoiseScale

    spec = MODELS[model_name]
    torch.manual_seed(0)
    backend = build_backend("ddp", info, micro_batch_size=MICRO)
    backend.setup(build_model(spec[0], num_classes=10, in_channels=spec[1]), lambda m: build_optimizer(m, SGD))
    cfg = TrainConfig(global_batch_size=MICRO * info.world_size, micro_batch_size=MICRO, epochs=0, max_steps=10**9,
                      eval_every_epochs=0, log_every_steps=10**9, progress_bar=False)
    batch = {"image": images, "label": labels, "bad_samples": torch.zeros((), dtype=torch.long)}
    parts = TrainerParts(
        backend=backend, schedule=_Constant(cfg.global_batch_size), set_hyperparams=set_hyperparams,
        train_data=_Repeat(batch), eval_loader_fn=lambda: iter(()),
        normalise=Normalise((0.5,) * spec[1], (0.25,) * spec[1], device=info.device, channels_last=False),
        dataset_size=10**9, noise=GradientNoiseScale() if noise else None,
        checkpointer=Checkpointer(tempfile.mkdtemp(), keep_last=1, rank=info.rank, world_size=info.world_size))
    trainer = Trainer(cfg, parts, max_bad_sample_fraction=1.0)
    if noise:
        backend.enable_noise_scale()
    return trainer


def _bare(model_name: str, info: DistInfo):
    spec = MODELS[model_name]
    torch.manual_seed(0)
    model = build_model(spec[0], num_classes=10, in_channels=spec[1])
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return model, optimizer


def _cpu_per_step(fn, steps: int) -> float:
    tic = time.thread_time()
    for _ in range(steps):
        fn()
    return (time.thread_time() - tic) / steps


def _run(rank: int, world_size: int, port: int, rounds: int, steps: int, out: dict) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size,
                    device=torch.device("cpu"))
    for name, (_, channels, size) in MODELS.items():
        g = torch.Generator().manual_seed(rank)
        images = torch.randint(0, 256, (MICRO, channels, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (MICRO,), generator=g)
        x = ((images.float() - 0.5 * 255) / (0.25 * 255))
        model, optimizer = _bare(name, info)

        def bare_step():
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        trainers = {noise: _trainer(name, info, images, labels, noise=noise) for noise in (False, True)}

        def ours(noise: bool):
            trainer = trainers[noise]
            return lambda: trainer.train_step(trainer._schedule_state())

        candidates = {"bare": bare_step, "dist_train": ours(False), "dist_train + noise scale": ours(True)}
        for fn in candidates.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in candidates}
        for r in range(rounds):
            order = list(candidates)[r % 3:] + list(candidates)[:r % 3]
            for label in order:
                times[label].append(_cpu_per_step(candidates[label], steps))
        if rank == 0:
            out[name] = {k: statistics.median(v) for k, v in times.items()}
    if world_size > 1:
        dist.destroy_process_group()


def _measure(world_size: int, rounds: int, steps: int) -> dict:
    if world_size == 1:
        out: dict = {}
        _run(0, 1, 0, rounds, steps, out)
        return out
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_run, args=(world_size, port, rounds, steps, shared), nprocs=world_size)
        return dict(shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, one thread per rank, micro-batch {MICRO}, SGD momentum\n")
    print("| model | ranks | bare ms/step | dist_train ms/step | dist_train / bare | with noise scale / bare |")
    print("|---|---|---|---|---|---|")
    for world_size in (1, 2):
        for name, t in _measure(world_size, args.rounds, args.steps).items():
            print(f"| {name} | {world_size} | {t['bare'] * 1e3:.1f} | {t['dist_train'] * 1e3:.1f} | "
                  f"{t['dist_train'] / t['bare']:.3f}x | {t['dist_train + noise scale'] / t['bare']:.3f}x |")


if __name__ == "__main__":
    main()
