"""A training step reads nothing back to the host but its one agreed flag vector.

On a GPU every ``.item()``, ``.tolist()``, ``bool(t)`` or ``float(t)`` of a device tensor waits for the
queue to drain. A dispatch mode sees no such thing on CPU (``.tolist()`` of a CPU tensor records no
``_local_scalar_dense``), so these tests patch the Tensor methods themselves and record who called them,
during whole non-log steps with gradient accumulation, Lookahead, the noise scale, the adaptive batch
decision and the progress bar (which shows B_simple on log steps) on, on 2 gloo ranks. The one read
allowed is ``faults.step_flags``' ``.tolist()``: skipping a non-finite step on every rank and stopping
within one step of a preemption need it (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import io
import traceback
from dataclasses import replace
from typing import Iterator

import pytest
import torch
from harness import global_batches, make_trainer
from multiproc import run_ranks
from tqdm import tqdm

from dist_train.optim.config import LookaheadConfig, OptimConfig

RADAM_LA = OptimConfig(name="radam", lr=0.01, momentum=0.9, weight_decay=1e-4,
                       lookahead=LookaheadConfig(k=2, alpha=0.5))
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def recorded_host_reads() -> Iterator[list[str]]:
    """Every host read of a tensor's value inside the block, as 'method at file:line in function'."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def recording(name, original):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            calls.append(f"{name} at {caller.filename.rsplit('/', 2)[-1]}:{caller.lineno} in {caller.name}")
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, recording(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _steps(rank, world_size, shard, reduction="auto"):
    from dist_train.noise_scale import GradientNoiseScale
    from dist_train.schedule import AdaptiveConfig, BatchSizeController

    # micro 8 x 2 ranks, B=32: 2 micro-steps per step. A high margin: the decision is taken every step, and
    # is "no" (the batch stays, so the steps compare), but computed all the same.
    controller = BatchSizeController(AdaptiveConfig(growth_factor=2.0, margin=1e9, min_steps_between_growths=1),
                                     start_global_batch_size=32, max_global_batch_size=128, batch_granularity=16)
    trainer = make_trainer(rank, world_size, batches=global_batches(6, 32), micro=8, optim=RADAM_LA, shard=shard,
                           backend_options={"sharded_reduction": reduction} if shard else None,
                           noise=GradientNoiseScale(ema_decay=0.5), batch_controller=controller)
    trainer.backend.enable_noise_scale()
    trainer.cfg = replace(trainer.cfg, log_every_steps=5)  # steps 1-4 are not log steps; step 5 is
    bar_text = io.StringIO()
    trainer._bar = tqdm(total=None, file=bar_text, dynamic_ncols=False, mininterval=0)
    reads = []
    for step in range(4):
        state = trainer._schedule_state()
        with recorded_host_reads() as calls:
            flags = trainer.train_step(state)
            trainer._after_step(state, flags)
        if step >= 2:  # once the optimizer state and the noise averages exist
            reads.append(calls)
    assert "B_simple" not in bar_text.getvalue()  # nothing shown, nor read, before the log step
    state = trainer._schedule_state()
    trainer._after_step(state, trainer.train_step(state))
    return reads, trainer.noise.b_simple, bar_text.getvalue()


@pytest.mark.parametrize("shard, reduction", [(False, "auto"), (True, "all_reduce"), (True, "reduce_scatter")],
                         ids=["replicated", "sharded", "sharded-reduce-scatter"])
def test_a_non_log_step_reads_only_the_agreed_flags_back_to_the_host(shard, reduction):
    for reads, b_simple, bar in run_ranks(_steps, shard, reduction, world_size=2):
        assert b_simple is not None  # the noise scale was measured
        assert f"B_simple={b_simple:.3g}" in bar and "B=32" in bar  # the progress bar shows it on the log step
        for calls in reads:
            assert len(calls) == 1 and calls[0].startswith("tolist at faults.py:") and calls[0].endswith(
                "in step_flags"), calls


def test_the_recorder_sees_a_host_read():
    # The test above can fail: a read of the kind today's code made (B_simple for the adaptive decision).
    from dist_train.noise_scale import GradientNoiseScale

    noise = GradientNoiseScale()
    with recorded_host_reads() as calls:
        _ = noise.b_simple
        bool(torch.ones(()) > 0)
    assert [c.split(" ")[0] for c in calls] == ["tolist", "__bool__"]


@pytest.mark.gpu
def test_on_a_gpu_a_non_log_step_synchronises_once():
    # What the patched methods above stand in for on CPU: CUDA's own sync detector, which warns on every
    # operation that waits for the device. The one wait allowed is step_flags' read of the agreed flags.
    import warnings

    from dist_train.noise_scale import GradientNoiseScale

    trainer = make_trainer(0, 1, batches=global_batches(6, 32), micro=8, optim=RADAM_LA,
                           noise=GradientNoiseScale(ema_decay=0.5), device="cuda")
    trainer.backend.enable_noise_scale()
    trainer.cfg = replace(trainer.cfg, log_every_steps=100)
    for _ in range(3):  # optimizer state, noise averages and RAdam's first steps behind us
        state = trainer._schedule_state()
        trainer._after_step(state, trainer.train_step(state))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = trainer._schedule_state()
            trainer._after_step(state, trainer.train_step(state))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, syncs
