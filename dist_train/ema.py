"""An exponential moving average of the model's weights (``train.ema_decay``), evaluated beside the model.

torch's ``AveragedModel`` with ``get_ema_multi_avg_fn`` does the averaging, as in torchvision's reference
recipe: after every ``train.ema_every_steps``-th optimizer step, e <- d e + (1 - d) theta over every
parameter and buffer (one foreach lerp); the first update copies theta. The decay applies per update, so
the average spans about ``ema_every_steps x B / (1 - d)`` samples, and grows with the batch.

In a checkpoint (docs/optimizers.md, "EMA of the weights"):
  - the averaged module's state_dict is the same on every rank, so the main rank alone writes it, to
    ``model-ema.pt``, with the module's own keys: ``dist-train export --weights ema`` copies it as it is,
    and every rank reads it back on resume, at any world size;
  - the update count (``n_averaged``) is this object's ``state_dict``, saved in every rank's file with the
    other small states: a resume that switches the EMA on or off is then refused as a change of parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dist_train.checkpoint import CheckpointError, load_tensor_file, save_tensor_file

EMA_MODEL_FILE = "model-ema.pt"


class WeightEMA:
    """The EMA of ``module``'s weights and BatchNorm statistics, on the module's device.

    ``broadcast_buffers(tensors)``: copies rank 0's values into ``tensors`` on every rank
    (``distributed.broadcast_tensors``). The parameters are the same on every rank after a step (DDP
    averages the gradients; the sharded optimizer all-gathers the update), so their averages are too. The
    buffers are not: each rank's BatchNorm updates its running statistics from its own micro-batches, and
    DDP makes them equal only at the next forward, by broadcasting rank 0's. So after each update the
    averaged buffers are broadcast from rank 0 (0.2 MB for a ResNet-50; nothing for a model without
    buffers): every rank then holds the average of rank 0's statistics, which is what rank 0 saves and
    every rank resumes from.

    Costs: one more copy of the model in device memory (0.1 GB for ResNet-50, 4 GB for 1B fp32
    parameters), and per update one read of both copies and one write of the average. On a GPU each update
    also waits once for the queued work: ``update_parameters`` copies ``n_averaged`` from the host to the
    device (a blocking copy), which ``ema_every_steps`` > 1 (torchvision's 32) makes rare.
    """

    def __init__(self, module: nn.Module, *, decay: float, every_steps: int = 1,
                 broadcast_buffers: Callable[[list[torch.Tensor]], None] = lambda tensors: None):
        assert 0.0 < decay < 1.0 and every_steps >= 1, (decay, every_steps)  # the config checks them
        self.decay = decay
        self.every_steps = every_steps
        self._broadcast_buffers = broadcast_buffers
        # use_buffers=True: BatchNorm's running statistics are averaged along with the weights, as torchvision
        # does, so the averaged weights are evaluated with statistics of the same horizon. With False, torch
        # would copy the trained model's current statistics into the average at each update instead.
        # n_averaged stays on the CPU (device=None): upstream reads it on the host at each update.
        self.averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model, with the trained module's structure and state_dict keys."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        """How many times the weights have been averaged in (AveragedModel's ``n_averaged``)."""
        return int(self.averaged.get_buffer("n_averaged"))

    @torch.no_grad()
    def update(self, model: nn.Module, *, step: int) -> None:
        """Average in ``model``'s weights after optimizer step ``step`` (counted from 1) if the step is an
        update step, every ``every_steps``-th. Collective across ranks when the model has buffers."""
        if step % self.every_steps:
            return
        self.averaged.update_parameters(model)
        self._broadcast_buffers(list(self.module.buffers()))

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"n_averaged": self.averaged.get_buffer("n_averaged").clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.get_buffer("n_averaged").copy_(state["n_averaged"])

    def save_weights(self, directory: Path) -> None:
        """Write the averaged module's state_dict to ``directory/model-ema.pt`` (the main rank calls it)."""
        save_tensor_file({k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                         directory / EMA_MODEL_FILE)

    def load_weights(self, directory: Path) -> None:
        """Load what ``save_weights`` wrote into ``directory``, strictly."""
        file = directory / EMA_MODEL_FILE
        if not file.is_file():
            raise CheckpointError(f"checkpoint {directory} has no {EMA_MODEL_FILE}, but this run keeps an EMA of "
                                  f"the weights (train.ema_decay); resume with the config it was written with")
        try:
            self.module.load_state_dict(load_tensor_file(file), strict=True)
        except (RuntimeError, KeyError) as err:
            raise CheckpointError(f"checkpoint {directory}: {EMA_MODEL_FILE} does not fit this run's model "
                                  f"({str(err)[:500]})") from None
