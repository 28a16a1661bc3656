"""Sweeps: expand ``--sweep`` grids and ``--sweep-override-set`` lists into one override list per run.

Pure functions, no SLURM: the SLURM adapter turns each member into one element of a job array.
Every member gets its own ``train.run_dir`` (and so its own checkpoints and MLflow run id file);
without that, members would resume from each other's checkpoints after a requeue.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Sequence

from dist_train.config import Config, ConfigError


@dataclass(frozen=True)
class SweepMember:
    tag: str
    """Short, path-safe name of this member, e.g. ``0-optim.lr=0.1``; used for its run dir and run name."""
    overrides: tuple[str, ...]
    """The member's own overrides, applied after the shared ones."""


def _key(override: str) -> str:
    if "=" not in override:
        raise ConfigError(f"sweep entry {override!r} must look like section.key=value")
    return override.split("=", 1)[0].strip()


def expand_grid(grid: list[str]) -> list[tuple[str, ...]]:
    """``["optim.lr=0.1,0.2", "train.seed=0,1"]`` -> the 4 combinations, first key slowest."""
    axes = []
    for spec in grid:
        key, values = _key(spec), spec.split("=", 1)[1].split(",")
        if not all(v.strip() for v in values):
            raise ConfigError(f"--sweep {spec!r}: empty value; write key=v1,v2,v3")
        axes.append([f"{key}={v.strip()}" for v in values])
    keys = [_key(spec) for spec in grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep names a key twice: {keys}; give each key once with comma-separated values")
    return [tuple(combo) for combo in itertools.product(*axes)]


def sweep_members(*, grid: Sequence[str] = (), override_sets: Sequence[str] = ()) -> list[SweepMember]:
    """Members of a sweep from either a grid (cartesian product) or explicit override sets; [] for no sweep."""
    if grid and override_sets:
        raise ConfigError("use either --sweep (a grid) or --sweep-override-set (explicit runs), not both")
    combos = expand_grid(list(grid)) if grid else [tuple(shlex.split(s)) for s in override_sets]
    for combo in combos:
        if not combo:
            raise ConfigError("--sweep-override-set got an empty set; give overrides like 'optim.lr=0.1 train.seed=1'")
        for override in combo:
            _key(override)
    return [SweepMember(tag=_tag(i, combo), overrides=combo) for i, combo in enumerate(combos)]


def _tag(index: int, overrides: tuple[str, ...]) -> str:
    readable = re.sub(r"[^A-Za-z0-9._=+-]+", "_", ",".join(overrides))
    return f"{index}-{readable[:80]}"


def separate_outputs(cfg: Config, member: SweepMember, *, given_keys: set[str]) -> tuple[str, ...]:
    """Overrides that give ``member`` its own run dir, checkpoint dir and MLflow run name.

    ``cfg`` is the member's resolved config. Keys in ``given_keys`` (the member's own sweep
    overrides) are left alone; a shared ``train.run_dir`` becomes the parent of the members' dirs.
    """
    extra = []
    if "train.run_dir" not in given_keys:
        extra.append(f"train.run_dir={PurePosixPath(cfg.train.run_dir) / member.tag}")
    if cfg.checkpoint.dir and "checkpoint.dir" not in given_keys:
        extra.append(f"checkpoint.dir={PurePosixPath(cfg.checkpoint.dir) / member.tag}")
    if "tracking.run_name" not in given_keys:
        name = f"{cfg.tracking.run_name}-{member.tag}" if cfg.tracking.run_name else member.tag
        extra.append(f"tracking.run_name={name}")
    return tuple(extra)


def keys_of(overrides: tuple[str, ...] | list[str]) -> set[str]:
    return {_key(o) for o in overrides}
