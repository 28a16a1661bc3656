"""Checkpoints: atomic, checksummed, and loaded without running code from the file.

A checkpoint is a directory ``step-NNNNNNNN/`` holding
  - ``rank-R.pt``: each rank's own training state (progress, RNG streams, noise-scale averages);
  - the backend's files (DDP: ``backend.pt`` written by rank 0; DeepSpeed: its per-rank shards);
  - the other weights evaluated, written by rank 0 for export: Lookahead's slow ones (``model-slow.pt``)
    and the EMA (``model-ema.pt``, which a resume reads too);
  - ``MANIFEST.json``: the world size, facts of the run that a resume must keep (``run``: the resolved
    precision), and a sha256 per file, written last.
It is written under a temporary name and renamed into place by rank 0 once every rank is done,
so a crash leaves either the previous set of checkpoints or the new one, never half of one. On
load, a checkpoint whose files do not match its manifest is reported and skipped for the
previous one. Multi-node runs need ``checkpoint.dir`` on a filesystem every node sees.

Nothing is unpickled: every file loads with ``weights_only`` (tensors, plain containers and, for DeepSpeed's
files, three record types of its own), also inside DeepSpeed, which asks torch for a full unpickle
(``weights_only_loading``). The sha256 manifest catches a truncated or corrupt file, not a malicious one:
whoever can write the files can write the manifest. docs/faults.md ("Security") says what is trusted.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch

from dist_train.files import sha256_file

if TYPE_CHECKING:
    from dist_train.parts import Stateful

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which one and what to do."""


def save_tensor_file(obj: Any, path: Path) -> None:
    """torch.save and fsync, so the bytes are on disk before the manifest that vouches for them."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_tensor_file(path: Path) -> Any:
    """A file of dist_train's own (tensors and plain containers), loaded weights-only: it cannot run code."""
    # mmap: the tensors are paged in from the file as they are copied into the model, not read into memory first.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(refused_pickle_message(path, err, allow="")) from None


# DeepSpeed 0.19 pickles these record types of its own into the ZeRO-1/2 optimizer files (listed with
# torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO-0/1/2 x fp32/bf16 checkpoints; ZeRO-0 files
# hold none). They are a dataclass, a static loss-scale holder and an IntEnum, rebuilt from their fields
# without calling code the file chooses. DynamicLossScaler is what fp16 (GPU only) stores instead of LossScaler.
DEEPSPEED_SAFE_TYPES = (
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
)
_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _safe_types() -> list[Any]:
    found = []
    for spec in DEEPSPEED_SAFE_TYPES:
        module, name = spec.split(":")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # DeepSpeed not installed, or a version without the type
            continue
    return found


@contextlib.contextmanager
def weights_only_loading(what: str, *, trust_pickle: bool = False, allow: str = "checkpoint.trust_pickle=true"
                         ) -> Iterator[None]:
    """Within the block every ``torch.load`` of this process is weights-only, whatever its caller asks for.

    DeepSpeed's checkpoint engine and ``zero_to_fp32`` call ``torch.load(weights_only=False)``: a full
    unpickle, which runs whatever callable the file names. torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides
    that at each call, and ``torch.serialization.safe_globals`` lets DeepSpeed's few record types through.
    A file that needs anything else raises CheckpointError naming ``what`` and the file, and saying how to
    ``allow`` it. ``trust_pickle``: the user's own say-so that the files are trusted; the block then changes
    nothing (DeepSpeed unpickles in full, as it does on its own)."""
    if trust_pickle:
        log.warning("%s: loading with full unpickling (trust_pickle): its files can run code as this user", what)
        yield
        return
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_safe_types()):
            yield
    except pickle.UnpicklingError as err:
        raise CheckpointError(refused_pickle_message(what, err, allow=allow)) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def refused_pickle_message(what: Any, err: Exception, *, allow: str) -> str:
    """Why a file was refused (the global torch's weights-only unpickler would not rebuild) and what to do."""
    # torch's own message goes on to suggest allowlisting the global, which is not the advice to give here.
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    detail = f"it names {named.group(1)}" if named else (str(err).splitlines() or [type(err).__name__])[0][:300]
    advice = (f"If it comes from a source you trust, and only then, allow a full unpickle with {allow}."
              if allow else "dist_train writes only tensors into these files: this one was not written by it.")
    return (f"{what} holds pickled Python objects besides tensors ({detail}); unpickling them could run "
            f"code, so dist_train loads weights only. {advice}")


class Checkpointer:
    """Writes and finds the checkpoints of one run, keeping the last ``keep_last``."""

    def __init__(self, directory: str | Path, *, keep_last: int, rank: int, world_size: int,
                 barrier: Callable[[], None] = lambda: None, broadcast: Callable[[Any], Any] = lambda obj: obj,
                 trust_pickle: bool = False):
        self.directory = Path(directory)
        self.trust_pickle = trust_pickle
        """``checkpoint.trust_pickle``: let the backend's files (DeepSpeed's) unpickle in full."""
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.broadcast = broadcast
        """``broadcast(obj)``: rank 0's ``obj`` on every rank (``distributed.broadcast_object``)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def paths(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name) and (p / MANIFEST).is_file())

    # --- save --------------------------------------------------------------------------------
    def save(self, *, step: int, states: Mapping[str, Stateful], save_backend: Callable[[Path], None],
             run: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. Each rank writes the ``state_dict()`` of every part in ``states``,
        by name, to its ``rank-R.pt``; ``save_backend(tmp_dir)`` writes the backend's files (which are
        collective and laid out by the backend); ``run`` (JSON values) goes into the manifest, for
        ``run_facts`` to read back before a resume."""
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".step-{step:08d}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash during an earlier save
            tmp.mkdir(parents=True)
        self.barrier()
        save_tensor_file({name: part.state_dict() for name, part in states.items()}, tmp / f"rank-{self.rank}.pt")
        save_backend(tmp)
        self.barrier()
        if self.is_main:
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {"step": step, "world_size": self.world_size, "run": run or {},
                        "files": {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                                  for p in files}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: the checkpoint appears whole or not at all
            for old in self.paths()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    # --- load --------------------------------------------------------------------------------
    def verify(self, path: Path) -> dict[str, Any]:
        """The manifest of ``path`` if every file matches it; else CheckpointError saying what is wrong."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST} ({err})") from None
        for name, meta in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is missing {name}")
            if file.stat().st_size != meta["bytes"] or sha256_file(file) != meta["sha256"]:
                raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (truncated or "
                                      f"corrupt)")
        return manifest

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose files match their manifest; corrupt ones are reported and skipped."""
        for path in reversed(self.paths()):
            try:
                self.verify(path)
            except CheckpointError as err:
                log.warning("%s; falling back to the previous checkpoint", err)
                continue
            return path
        return None

    def choose_resume(self) -> Path | None:
        """Collective: the checkpoint every rank resumes from, chosen by rank 0 alone and broadcast.

        Rank 0 lists the directory and verifies every file of its choice (one read of the checkpoint, not
        one per rank); the others take its choice, never their own listing: a rank whose view of a shared
        filesystem is stale (NFS caches directory listings) still loads the step rank 0 chose, so the
        replicas cannot diverge. Each rank then checks the checksum of its own file as it loads it."""
        chosen = None
        if self.is_main:
            latest = self.latest_valid()
            chosen = latest.name if latest is not None else None
        chosen = self.broadcast(chosen)
        if chosen is None:
            return None
        path = self.directory / chosen
        if not self.is_main and not (path / MANIFEST).is_file():
            raise CheckpointError(f"rank 0 resumes from {path}, which this rank ({self.rank}) cannot see; checkpoint.dir "
                                  f"must be on a filesystem every node shares")
        return path

    @staticmethod
    def run_facts(path: Path | None) -> dict[str, Any]:
        """The ``run`` facts recorded in checkpoint ``path``'s manifest; empty for none, or for a checkpoint
        written before they were recorded."""
        if path is None:
            return {}
        try:
            return dict(json.loads((path / MANIFEST).read_text()).get("run", {}))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST} ({err})") from None

    def load_states(self, path: Path, states: Mapping[str, Stateful], *, elastic: bool = False) -> None:
        """Load this rank's parts from a checkpoint ``choose_resume()`` returned, strictly: the checkpoint must
        hold exactly the parts in ``states``."""
        saved = self.load_rank_state(path, elastic=elastic)
        if set(saved) != set(states):
            raise CheckpointError(
                f"checkpoint {path} holds the parts {sorted(saved)} but this run has {sorted(states)} (the noise "
                f"scale, the adaptive batch or the EMA of the weights switched on or off? a checkpoint without "
                f"'data' comes from a dist_train that did not save the data position); resume with the config and "
                f"version it was written with (its config.yaml in train.run_dir), or start afresh in a new "
                f"train.run_dir")
        for name, part in states.items():
            part.load_state_dict(saved[name])

    def load_rank_state(self, path: Path, *, elastic: bool = False) -> dict[str, Any]:
        """This rank's own state from a checkpoint ``choose_resume()`` returned, after checking the world size
        and the file's checksum.

        ``elastic``: a checkpoint of another world size is taken too (the backend's files must allow it). The
        parts in a rank file are the same on every rank (progress, data position, noise scale, batch
        controller) except the torch RNG, so rank r reads ``rank-(r mod W_saved).pt``: a rank that did not
        exist before starts from another rank's RNG stream."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST} ({err})") from None
        saved_world = int(manifest["world_size"])
        if saved_world != self.world_size and not elastic:
            raise CheckpointError(
                f"checkpoint {path} was written by {saved_world} ranks but this run has "
                f"{self.world_size}, and this backend cannot change the world size on resume; relaunch with "
                f"{saved_world} ranks, or start a fresh run in a new train.run_dir (or checkpoint.resume=false)")
        if saved_world != self.world_size and self.is_main:
            log.warning("checkpoint %s was written by %d ranks; resuming on %d (elastic: same global batch, "
                        "accumulation steps follow the new world size)", path, saved_world, self.world_size)
        name = f"rank-{self.rank % saved_world}.pt"
        meta = manifest.get("files", {}).get(name)
        if meta is None or sha256_file(path / name) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is missing or does not match its checksum; delete the "
                                  f"checkpoint to fall back to the previous one")
        try:
            return load_tensor_file(path / name)
        except Exception as err:  # a bad pickle opcode, a disallowed global...
            raise CheckpointError(f"checkpoint {path}: {name} cannot be read ({err}); delete the "
                                  f"checkpoint to fall back to the previous one") from err
