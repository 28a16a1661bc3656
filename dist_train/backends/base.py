"""The backend interface: everything the trainer needs from DDP or DeepSpeed, and nothing else.

The trainer calls, per optimizer step: ``set_global_batch_size`` (returns the
accumulation steps), then for each micro-batch ``grad_sync(last)`` around a
forward through ``model`` and a ``backward``, then ``optimizer_step``.
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from dist_train.checkpoint import CheckpointError, load_tensor_file, save_tensor_file
from dist_train.config import accumulation_steps
from dist_train.distributed import DistInfo, barrier

BACKEND_FILE = "backend.pt"
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Backend(abc.ABC):
    """Set-up, backward, optimizer step, batch size, collectives and state of one training run."""

    precision: str = "fp32"
    """The numerics it trains in, ``fp32``, ``bf16`` or ``fp16`` (resolved: never ``auto``); checkpoints record it."""

    resumes_at_any_world_size: bool = False
    """Whether ``load_from`` takes a checkpoint written by another number of ranks (elastic resume)."""

    def __init__(self, info: DistInfo, *, micro_batch_size: int):
        self.info = info
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = 0
        self.accum_steps = 0

    # --- set-up -------------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Move ``model`` to the device, wrap it, and build its optimizer."""

    @property
    @abc.abstractmethod
    def model(self) -> nn.Module:
        """What the trainer calls for the training forward pass (possibly a wrapper)."""

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The bare model, for evaluation and export."""

    @property
    @abc.abstractmethod
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose hyperparameters the schedule sets."""

    # --- one step ----------------------------------------------------------------------------
    def set_global_batch_size(self, global_batch_size: int) -> int:
        """Set B for the following steps; returns the accumulation steps. A clear error if B does not divide."""
        self.accum_steps = accumulation_steps(global_batch_size, micro_batch_size=self.micro_batch_size,
                                              world_size=self.info.world_size)
        self.global_batch_size = global_batch_size
        return self.accum_steps

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass; backends that cast the model themselves need none."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; gradients are all-reduced only if ``enabled``."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already divided by the accumulation steps."""

    def discard_gradients(self) -> None:
        """Drop this step's gradients without updating (a skipped non-finite step)."""
        self.optimizer.zero_grad(set_to_none=True)

    @abc.abstractmethod
    def grads_finite(self) -> torch.Tensor:
        """Whether this step's synced gradients are all finite: a 0-dim bool tensor on the device, the same on
        every rank (collective where the gradients are sharded). Asked before ``optimizer_step``, so that a
        finite loss with non-finite gradients is skipped or stopped like a non-finite loss."""

    @abc.abstractmethod
    def optimizer_step(self, *, grad_clip_norm: float = 0.0) -> torch.Tensor:
        """Step the optimizer on the synced gradients, zero them, and return the global gradient norm."""

    # --- collectives -------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.info.is_distributed:
            dist.all_reduce(tensor, op=op)
        return tensor

    def barrier(self) -> None:
        barrier(self.info)

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    # --- state -------------------------------------------------------------------------------
    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state; a collective call on all ranks (sharded state is gathered)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Strict load of what ``state_dict`` returned, on every rank."""

    def save_to(self, directory: Path) -> None:
        """Collective: write this backend's part of a checkpoint into ``directory``.

        The default gathers ``state_dict()`` and has the main rank write it; DeepSpeed overrides this
        to let every rank write its own shards."""
        state = self.state_dict()
        if self.is_main:
            save_tensor_file(state, directory / BACKEND_FILE)

    def load_from(self, directory: Path) -> None:
        """Load what ``save_to`` wrote; a clear error if it belongs to another model or optimizer."""
        state = load_tensor_file(directory / BACKEND_FILE)
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {directory} does not fit this run's model or optimizer ({str(err)[:500]}); "
                f"resume with the config it was written with (its config.yaml in train.run_dir), or start "
                f"afresh in a new train.run_dir") from None
