"""Checkpoints: written by the main rank, atomically, and loaded without running code from the file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and what to do."""


class Checkpointer:
    """Saves ``step-NNNNNNNN.pt`` files in one directory and keeps the last ``keep_last``."""

    def __init__(self, directory: str | Path, *, keep_last: int, is_main: bool):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.is_main = is_main

    def paths(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, state: dict[str, Any], *, step: int) -> Path | None:
        """Write ``state`` as the checkpoint of ``step`` (main rank only); returns its path there."""
        if not self.is_main:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step-{step:08d}.pt"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        # A rename is atomic: a reader sees the old set of checkpoints or the new one, never half a file.
        os.replace(tmp, path)
        for old in self.paths()[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def load(self, path: str | Path) -> dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
        except Exception as err:  # truncated zip, bad pickle opcode, disallowed global...
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({err}); delete it to fall back to "
                                  f"the previous one, or set checkpoint.resume=false to start afresh") from err
