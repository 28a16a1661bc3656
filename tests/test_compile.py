"""``model.compile``: torch.compile (inductor, on CPU) trains as eager does, checkpoints plain names, resumes.

Inductor fuses and reorders the float operations of the forward and backward, so compiled losses match
eager ones to rtol 1e-4 over 20 steps, not bit for bit; a compiled run against itself (resume) is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import global_batches, make_trainer, params_of, tiny_net
from harness import train_losses as _losses
from multiproc import run_ranks

from dist_train.models import compile_in_place
from dist_train.optim.config import LookaheadConfig, OptimConfig

RADAM_LA = OptimConfig(name="radam", lr=0.01, momentum=0.9, weight_decay=1e-4,
                       lookahead=LookaheadConfig(k=3, alpha=0.5))
SIZES = [16] * 10 + [32] * 10  # micro 8 on 2 ranks: 1 micro-step, then 2 after the batch doubles
STOP = 13


def _trainer(rank, world_size, run_dir, compiled):
    return make_trainer(rank, world_size, batches=global_batches(len(SIZES), SIZES), micro=8, optim=RADAM_LA,
                        run_dir=run_dir, model_fn=lambda: compile_in_place(tiny_net()) if compiled else tiny_net())


def _runs(rank, world_size, root):
    eager = _losses(_trainer(rank, world_size, f"{root}/eager", False), len(SIZES))
    compiled = _trainer(rank, world_size, f"{root}/compiled", True)
    losses = _losses(compiled, STOP)
    path = compiled.save_checkpoint()
    losses += _losses(compiled, len(SIZES) - STOP)
    resumed = _trainer(rank, world_size, f"{root}/compiled", True)
    resumed.load_checkpoint(path)
    return eager, losses, _losses(resumed, len(SIZES) - STOP), str(path), params_of(compiled), params_of(resumed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(_runs, str(tmp_path_factory.mktemp("compile")), world_size=2, timeout_s=600)


def test_compiled_training_matches_eager_with_accumulation_and_a_batch_change(runs):
    for eager, compiled, *_ in runs:
        assert len(compiled) == len(SIZES)
        torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=0)
        assert abs(eager[-1] - eager[0]) > 1e-2  # the losses moved: the comparison means something


def test_a_compiled_run_checkpoints_plain_names_and_resumes_exactly(runs):
    from dist_train.backends.export import export_state_dict

    (_, compiled, resumed, path, params, resumed_params), _ = runs
    assert resumed == compiled[STOP:]  # the same compiled code on the same state: bit for bit
    assert torch.equal(params, resumed_params)
    saved = torch.load(Path(path) / "backend.pt", weights_only=True)["model"]
    assert set(saved) == set(tiny_net().state_dict())  # no "_orig_mod." anywhere
    exported = torch.load(export_state_dict(path, Path(path).parent / "model.pt"), weights_only=True)
    tiny_net().load_state_dict(exported, strict=True)
