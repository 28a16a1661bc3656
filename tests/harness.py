"""Build a real Trainer over known global batches, so runs at different world sizes see the same samples.

Step s of a run consumes global batch s, whatever the world size and accumulation: rank r takes
its contiguous share of it and splits that share into micro-batches. A single process given the
same global batches is the reference every distributed run is compared against.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from dist_train.backends import build_backend
from dist_train.checkpoint import Checkpointer
from dist_train.config import TrainConfig
from dist_train.distributed import DistInfo, broadcast_object, broadcast_tensors
from dist_train.ema import WeightEMA
from dist_train.optim import build_optimizer, set_hyperparams
from dist_train.optim.config import OptimConfig
from dist_train.parts import TrainerParts
from dist_train.schedule import ScheduleState
from dist_train.trainer import Normalise, Trainer


def tiny_net(seed: int = 0) -> nn.Module:
    """A small conv net without BatchNorm: BN statistics depend on how a batch is split, gradients do not."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))


def global_batches(n_steps: int, sizes: Sequence[int] | int, *, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = [sizes] * n_steps if isinstance(sizes, int) else list(sizes)
    return [{"image": torch.randint(0, 256, (b, 1, 28, 28), dtype=torch.uint8, generator=g),
             "label": torch.randint(0, 10, (b,), generator=g)} for b in sizes]


def rank_stream(batches: list[dict], *, rank: int, world_size: int, micro: int) -> Iterator[dict]:
    for batch in batches:
        share = len(batch["label"]) // world_size
        lo = rank * share
        for i in range(lo, lo + share, micro):
            yield {"image": batch["image"][i:i + micro], "label": batch["label"][i:i + micro],
                   "bad_samples": torch.zeros((), dtype=torch.long)}


class ListStream:
    """``rank_stream`` as a ``Stateful`` data stream. Its position is the samples all ranks have drawn, which
    means the same at any world size: a run resumed on other ranks continues with the next global batch."""

    def __init__(self, batches: list[dict], *, rank: int, world_size: int, micro: int):
        self.batches, self.rank, self.world_size, self.micro = batches, rank, world_size, micro
        self.drawn = 0

    def __iter__(self) -> Iterator[dict]:
        stream = rank_stream(self.batches, rank=self.rank, world_size=self.world_size, micro=self.micro)
        for _ in range(self.drawn):  # in memory: skipping is free here, unlike the shard reader's replay
            next(stream)
        for batch in stream:
            self.drawn += 1
            yield batch

    def state_dict(self) -> dict:
        return {"samples": self.drawn * self.world_size * self.micro}

    def load_state_dict(self, state: dict) -> None:
        per_round = self.world_size * self.micro
        assert int(state["samples"]) % per_round == 0, "the saved position must fall on a whole micro-batch round"
        self.drawn = int(state["samples"]) // per_round


class ListSchedule:
    """A schedule that returns the given global batch size at each step (in order of samples seen)."""

    def __init__(self, sizes: Sequence[int], *, lr: float = 0.05, momentum: float = 0.9):
        self.sizes, self.lr, self.momentum = list(sizes), lr, momentum
        self.bounds = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]

    def state_at(self, samples_seen: int, *, global_batch_size: int | None = None) -> ScheduleState:
        step = self.bounds.index(samples_seen)
        return ScheduleState(epoch=samples_seen / self.bounds[-1], lr=self.lr, global_batch_size=self.sizes[step],
                             momentum=self.momentum, noise_scale=float("nan"), milestones_passed=0)


def make_trainer(rank: int, world_size: int, *, batches: list[dict], micro: int, optim: OptimConfig,
                 model_fn: Callable[[], nn.Module] = tiny_net, shard: bool = False, run_dir: str = "",
                 checkpoint_every_steps: int = 0, backend: str = "ddp",
                 backend_options: dict | None = None, schedule=None, noise=None, batch_controller=None,
                 ema_decay: float = 0.0, ema_every_steps: int = 1,
                 train_data=None, batch_mixer=None, device: str = "cpu") -> Trainer:
    """A Trainer over ``batches`` (or over ``train_data``, a real stream, in steps of the batches' sizes);
    ``schedule`` defaults to one that follows the batches' sizes."""
    sizes = [len(b["label"]) for b in batches]
    info = DistInfo(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size,
                    device=torch.device(device))
    backend = build_backend(backend, info, micro_batch_size=micro, **(backend_options or {}))
    backend.setup(model_fn(), lambda m: build_optimizer(m, optim, shard=shard))
    ema = (WeightEMA(backend.module, decay=ema_decay, every_steps=ema_every_steps,
                     broadcast_buffers=partial(broadcast_tensors, info)) if ema_decay else None)
    cfg = TrainConfig(global_batch_size=sizes[0], micro_batch_size=micro, epochs=0, max_steps=len(batches),
                      eval_every_epochs=0, log_every_steps=1, progress_bar=False)
    parts = TrainerParts(
        backend=backend, schedule=schedule or ListSchedule(sizes), set_hyperparams=set_hyperparams,
        train_data=train_data or ListStream(batches, rank=rank, world_size=world_size, micro=micro),
        eval_loader_fn=lambda: iter(()), normalise=Normalise((0.5,), (0.25,), device=info.device, channels_last=False),
        ema=ema,
        dataset_size=sum(sizes), noise=noise, batch_controller=batch_controller, batch_mixer=batch_mixer,
        checkpointer=Checkpointer(run_dir or "/nonexistent", keep_last=2, rank=rank, world_size=world_size,
                                  barrier=backend.barrier, broadcast=lambda obj: broadcast_object(info, obj)))
    return Trainer(cfg, parts, max_bad_sample_fraction=0.5, checkpoint_every_steps=checkpoint_every_steps)


def train_losses(trainer: Trainer, n: int) -> list[float]:
    """``n`` steps at the schedule's state; the training loss of each."""
    out = []
    for _ in range(n):
        trainer.train_step(trainer.schedule.state_at(trainer.progress.samples_seen))
        out.append(trainer.collect_train_metrics()["train/loss"])
    return out


def params_of(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.backend.module.parameters()])
