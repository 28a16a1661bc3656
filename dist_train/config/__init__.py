"""Typed, strict configuration: one frozen dataclass per component."""

from __future__ import annotations

from pathlib import Path

from dist_train.config.check import check
from dist_train.config.loader import ConfigError, flatten, from_dict, merge_overrides, read_yaml, to_dict
from dist_train.config.schema import (
    BackendConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then dotted ``overrides``."""
    data = read_yaml(path) if path else {}
    return from_dict(Config, merge_overrides(data, list(overrides)))


def accumulation_steps(global_batch_size: int, *, micro_batch_size: int, world_size: int) -> int:
    """Micro-steps per optimizer step; a clear error when the global batch does not divide."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} is not divisible by "
            f"train.micro_batch_size x world size = {micro_batch_size} x {world_size} = {per_step}; "
            f"use a global batch that is a multiple of {per_step} (schedule factors and caps included), "
            f"or change train.micro_batch_size"
        )
    return global_batch_size // per_step


__all__ = [
    "BackendConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "ModelConfig",
    "TrackingConfig", "TrainConfig", "accumulation_steps", "check", "flatten", "from_dict", "load_config",
    "merge_overrides", "to_dict",
]
