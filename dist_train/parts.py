"""What the Trainer is built from: the protocols of its collaborators, and one object that holds them.

The Trainer sees interfaces only. Each protocol here is what it calls, nothing more, so a test can
give it a plain object with those methods, and a new schedule, estimator or controller is a new class
that meets the protocol, not a new branch in the loop. Everything that must survive a restart is a
``Stateful``; the Checkpointer saves a named set of them (``Trainer.states``), as torchtitan's
``CheckpointManager(states=...)`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:  # the annotations only: importing these at run time would pull in torch and mlflow
    from pathlib import Path

    import torch
    from torch import nn

    from dist_train.backends import Backend
    from dist_train.checkpoint import Checkpointer
    from dist_train.noise_scale import NoiseMeasurement
    from dist_train.schedule import ScheduleState
    from dist_train.tracking import Tracker
    from dist_train.trainer import Normalise


@runtime_checkable
class Stateful(Protocol):
    """A part of the run that a checkpoint saves and a resume restores, exactly."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class DataStream(Stateful, Protocol):
    """This rank's endless stream of training micro-batches. Its state is its position: after
    ``load_state_dict``, the next iterator starts where the saved stream stood, without replaying it."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


class TrainingSchedule(Protocol):
    """Maps samples seen to the training state of the next step (a pure function: it holds no state)."""

    def state_at(self, samples_seen: int, *, global_batch_size: int | None = None) -> ScheduleState: ...


class NoiseEstimator(Stateful, Protocol):
    """Smooths each step's noise-scale measurement; ``b_simple`` is None until it has seen enough."""

    def update(self, measurement: NoiseMeasurement) -> None: ...

    @property
    def b_simple(self) -> float | None: ...

    def b_simple_exceeds(self, threshold: float) -> torch.Tensor:
        """``b_simple > threshold`` as a device bool, not read on the host."""
        ...

    def metrics(self) -> dict[str, float]: ...


class BatchController(Stateful, Protocol):
    """Decides the global batch of the adaptive mode from the measured noise scale."""

    @property
    def global_batch_size(self) -> int: ...

    def update(self, *, step: int, b_simple: float | None) -> bool: ...

    def threshold_at(self, step: int) -> float | None:
        """The B_simple above which the batch grows after ``step``; None when it cannot grow then."""
        ...

    def grow(self, step: int) -> None: ...


class BatchMixer(Protocol):
    """Mixes a device micro-batch (MixUp, CutMix) and returns its targets as class probabilities, (micro,
    classes). Its draws are a pure function of the key (step, rank, micro-batch), so it holds no state."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, step: int, rank: int,
                 micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class WeightAverage(Stateful, Protocol):
    """An average of the model's weights kept beside it (the EMA, ``dist_train.ema``), evaluated as a model of
    its own. Its weights are the same on every rank and go to a file of their own, which the main rank
    writes; its ``state_dict`` holds the rest."""

    @property
    def module(self) -> nn.Module:
        """The averaged model, to evaluate."""
        ...

    def update(self, model: nn.Module, *, step: int) -> None:
        """After optimizer step ``step`` (counted from 1), on every rank."""
        ...

    def save_weights(self, directory: Path) -> None: ...

    def load_weights(self, directory: Path) -> None: ...


def _null_tracker() -> Tracker:
    from dist_train.tracking import NullTracker

    return NullTracker()


@dataclass(frozen=True)
class TrainerParts:
    """The collaborators of one run's Trainer, built by ``dist_train.train`` (or a test) and passed once."""

    backend: Backend
    schedule: TrainingSchedule
    set_hyperparams: Callable[..., None]
    """``set_hyperparams(optimizer, lr=..., momentum=...)``: writes the schedule's state into the optimizer."""
    train_data: DataStream
    """This rank's training micro-batches; saved and restored with the other states."""
    eval_loader_fn: Callable[[], Iterable[dict]]
    """One pass over this rank's share of the evaluation split."""
    normalise: Normalise
    dataset_size: int
    checkpointer: Checkpointer
    tracker: Tracker = field(default_factory=_null_tracker)
    noise: NoiseEstimator | None = None
    """Fed by the backend's measurement each step, or None when the noise scale is not measured."""
    batch_controller: BatchController | None = None
    """The adaptive mode's controller (needs ``noise``), or None."""
    ema: WeightAverage | None = None
    """The EMA of the weights (``train.ema_decay``), or None."""
    batch_mixer: BatchMixer | None = None
    """MixUp/CutMix of each training micro-batch before the forward (``dist_train/mixing.py``), or None."""
    logged_through_step: int = 0
    """Training metrics up to this step are already in the tracker (a continued run)."""
