"""No load path unpickles: a checkpoint file crafted to run code is refused on resume and on export.

Each crafted file is a real checkpoint file of its backend with one more entry, an object whose unpickling
calls ``open(marker, "w")``: it creates a file. The manifest is rewritten to match, as whoever wrote the
files could. Every test also shows that the crafted file does run code when unpickled in full (the
control), so a refusal is not an accident of a broken file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from harness import global_batches, make_trainer
from multiproc import run_ranks

from dist_train.backends.export import export_state_dict
from dist_train.checkpoint import MANIFEST, CheckpointError
from dist_train.optim.config import OptimConfig

RADAM = OptimConfig(name="radam", lr=0.01, momentum=0.9, weight_decay=1e-4)


class Plant:
    """Unpickling it runs ``open(marker, "w")``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(file: Path, marker: Path) -> None:
    """Add a ``Plant`` to the checkpoint file ``file`` and rewrite its manifest entry to match."""
    state = torch.load(file, map_location="cpu", weights_only=False)  # our own test file: trusted
    state["__plant__"] = Plant(marker)
    torch.save(state, file)
    manifest_file = file.parent / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["files"][file.name] = {"sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                                    "bytes": file.stat().st_size}
    manifest_file.write_text(json.dumps(manifest))


def _trainer(run_dir: str, *, backend: str, shard: bool = False, zero_stage: int = 1):
    options = {"zero_stage": zero_stage} if backend == "deepspeed" else None
    return make_trainer(0, 1, batches=global_batches(2, 16), micro=8, optim=RADAM, shard=shard, run_dir=run_dir,
                        backend=backend, backend_options=options)


def _checkpoint(run_dir: str, **kw) -> str:
    trainer = _trainer(run_dir, **kw)
    trainer.train_step(trainer.schedule.state_at(0))
    return str(trainer.save_checkpoint())


def _resume(run_dir: str, path: str, *, trust_pickle: bool = False, **kw) -> str | None:
    """The error of resuming from ``path``; None if it loaded."""
    trainer = _trainer(run_dir, **kw)
    trainer.checkpointer.trust_pickle = trust_pickle
    try:
        trainer.load_checkpoint(Path(path))
    except Exception as err:  # the control may fail after unpickling: only the marker matters there
        return f"{type(err).__name__}: {err}"
    return None


# --- DDP, replicated and sharded: backend.pt -----------------------------------------------------
def _ddp_case(rank, world_size, run_dir, shard, marker):
    path = _checkpoint(run_dir, backend="ddp", shard=shard)
    plant(Path(path) / "backend.pt", Path(marker))
    return path, _resume(run_dir, path, backend="ddp", shard=shard)


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_a_ddp_checkpoint_that_would_run_code_is_refused_on_resume_and_export(tmp_path, shard):
    marker = tmp_path / "owned"
    (path, error), = run_ranks(_ddp_case, str(tmp_path / "run"), shard, str(marker), world_size=1)
    assert error is not None and error.startswith("CheckpointError")
    assert "backend.pt" in error and "it names io.open" in error and "not written by" in error
    with pytest.raises(CheckpointError, match="unpickling them could run code"):
        export_state_dict(path, tmp_path / "model.pt")
    assert not marker.exists() and not (tmp_path / "model.pt").exists()
    torch.load(Path(path) / "backend.pt", weights_only=False)  # the control: a full unpickle runs it
    assert marker.exists()


# --- DeepSpeed ZeRO-0/1/2: its model file (ZeRO-0) or this rank's optimizer partition (ZeRO-1/2) ----
STAGES = (0, 1, 2)


def _deepspeed_cases(rank, world_size, root, markers):
    out = {}
    for stage in STAGES:
        run_dir = f"{root}/zero{stage}"
        path = _checkpoint(run_dir, backend="deepspeed", zero_stage=stage)
        name = "mp_rank_00_model_states.pt" if stage == 0 else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        untouched = _resume(run_dir, path, backend="deepspeed", zero_stage=stage)  # the real files load
        plant(Path(path) / name, Path(markers[stage]))
        refused = _resume(run_dir, path, backend="deepspeed", zero_stage=stage)
        planted_before_trust = Path(markers[stage]).exists()
        _resume(run_dir, path, trust_pickle=True, backend="deepspeed", zero_stage=stage)  # the control
        out[stage] = dict(path=path, name=name, untouched=untouched, refused=refused,
                          planted_before_trust=planted_before_trust, planted_with_trust=Path(markers[stage]).exists())
    return out


@pytest.fixture(scope="module")
def deepspeed_cases(tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("crafted")
    markers = {stage: str(root / f"owned-resume-{stage}") for stage in STAGES}
    (cases,) = run_ranks(_deepspeed_cases, str(root), markers, world_size=1, timeout_s=600)
    return cases, root


@pytest.mark.parametrize("stage", STAGES)
def test_a_deepspeed_checkpoint_that_would_run_code_is_refused_on_resume(deepspeed_cases, stage):
    case = deepspeed_cases[0][stage]
    assert case["untouched"] is None  # DeepSpeed's own files load weights-only
    assert case["refused"] is not None and case["refused"].startswith("CheckpointError")
    assert "unpickling them could run code" in case["refused"] and "checkpoint.trust_pickle=true" in case["refused"]
    assert not case["planted_before_trust"]
    assert case["planted_with_trust"]  # the control: DeepSpeed's own full unpickle runs it


@pytest.mark.parametrize("stage", STAGES)
def test_a_deepspeed_checkpoint_that_would_run_code_is_refused_on_export(deepspeed_cases, stage, tmp_path):
    case = deepspeed_cases[0][stage]
    marker = Path(f"{deepspeed_cases[1]}/owned-resume-{stage}")
    marker.unlink()  # left by the resume control
    with pytest.raises(CheckpointError, match="export --trust-pickle"):
        export_state_dict(case["path"], tmp_path / "model.pt")
    assert not marker.exists() and not (tmp_path / "model.pt").exists()
    export_state_dict(case["path"], tmp_path / "model.pt", trust_pickle=True)  # the control
    assert marker.exists() and (tmp_path / "model.pt").is_file()
