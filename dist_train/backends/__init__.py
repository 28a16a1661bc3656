"""Training backends behind one interface (``base.Backend``), with optional capabilities (``capabilities``).

A backend is one module with one class. ``BACKENDS`` names it; ``build_backend`` imports it only when
it is asked for, so that ``import dist_train`` never pulls in deepspeed.
"""

from __future__ import annotations

import importlib
from typing import Any

from dist_train.backends.base import Backend
from dist_train.backends.capabilities import HoldsSlowWeights, MeasuresNoiseScale
from dist_train.distributed import DistInfo

BACKENDS = {
    "ddp": "dist_train.backends.ddp:DDPBackend",
    "deepspeed": "dist_train.backends.deepspeed:DeepSpeedBackend",
}
"""``backend.name`` -> ``module:class``. A new backend is a new module and one entry here (and in
``BackendConfig.name``'s choices)."""


def build_backend(name: str, info: DistInfo, *, micro_batch_size: int, **options: Any) -> Backend:
    """The backend ``name``, not yet set up; its keyword ``options`` come from ``BackendConfig.options``."""
    try:
        module_name, class_name = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"backend.name={name!r} is not known; use one of {', '.join(BACKENDS)}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(info, micro_batch_size=micro_batch_size, **options)


__all__ = ["BACKENDS", "Backend", "HoldsSlowWeights", "MeasuresNoiseScale", "build_backend"]
