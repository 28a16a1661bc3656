"""What a backend may do beyond the core interface (``base.Backend``), each a small protocol of its own.

As Lightning splits ``_BackwardSyncControl`` from ``Strategy``, a backend implements only the
capabilities it has. The trainer asks with ``isinstance`` and does without, or the run is refused at
start with a clear error, where one is missing. Both of dist_train's backends have both.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from dist_train.distributed import DistInfo
    from dist_train.noise_scale import NoiseMeasurement

SLOW_MODEL_FILE = "model-slow.pt"  # with Lookahead: the slow weights, as a module state_dict


@runtime_checkable
class MeasuresNoiseScale(Protocol):
    """Measures |G_small|^2 and |G_big|^2 each step (docs/theory.md section 2)."""

    def enable_noise_scale(self, *, preconditioned: bool = False) -> None:
        """Start measuring; call after ``setup``. ``preconditioned``: of P^-1 g (Adam-type optimizers)."""

    def noise_measurement(self) -> NoiseMeasurement | None:
        """This step's measurement after the synced backward and before ``optimizer_step``; None when not
        measurable this step (one process without accumulation)."""


@runtime_checkable
class HoldsSlowWeights(Protocol):
    """Can put Lookahead's slow weights into the module, for evaluation and export."""

    def slow_weights(self) -> contextlib.AbstractContextManager:
        """Context in which the module holds the slow weights (collective); a no-op without Lookahead."""

    def save_slow_weights(self, directory: Path) -> None:
        """Collective, with Lookahead only: the main rank writes ``SLOW_MODEL_FILE`` into ``directory``."""


class _BackendWithOptimizer(Protocol):
    """What ``LookaheadSlowWeights`` needs of the backend it is mixed into."""

    info: DistInfo

    @property
    def optimizer(self) -> Optimizer: ...

    @property
    def module(self) -> nn.Module: ...

    def slow_weights(self) -> contextlib.AbstractContextManager: ...


class LookaheadSlowWeights:
    """``HoldsSlowWeights`` for a backend whose ``optimizer`` is dist_train's Lookahead (sharded or not)."""

    def slow_weights(self: _BackendWithOptimizer) -> contextlib.AbstractContextManager:
        from dist_train.optim import slow_weights

        return slow_weights(self.optimizer)

    def save_slow_weights(self: _BackendWithOptimizer, directory: Path) -> None:
        """The module's state_dict with the slow weights swapped in (and the BN statistics as they are): the
        model that evaluation measures, so ``dist-train export`` can write it without knowing how the
        optimizer state is laid out or sharded. Resuming does not read it."""
        from dist_train.checkpoint import save_tensor_file
        from dist_train.optim import has_slow_weights

        if not has_slow_weights(self.optimizer):
            return
        with self.slow_weights():
            if self.info.is_main:
                save_tensor_file({k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                                 directory / SLOW_MODEL_FILE)
