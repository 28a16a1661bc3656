"""The sharded optimizer's two gradient paths give the replicated DDP step's numbers, in the whole trainer.

``reduce_scatter`` leaves each rank's gradient unreduced in DDP's comm hook and reduce-scatters it into the
shards; ``all_reduce`` lets DDP average and slices the result (dist_train/optim/sharded.py). On 2 gloo ranks,
with accumulation, a batch change, gradient clipping that bites, the noise scale and Lookahead on, both must
track the replicated optimizer: parameters, gradient norms and the noise-scale estimates.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from harness import global_batches, make_trainer, params_of
from multiproc import run_ranks

from dist_train.optim.config import LookaheadConfig, OptimConfig

RADAM_LA = OptimConfig(name="radam", lr=0.01, momentum=0.9, weight_decay=1e-4,
                       lookahead=LookaheadConfig(k=2, alpha=0.5))
LAYOUTS = {"replicated": (False, "auto"), "all_reduce": (True, "all_reduce"),
           "reduce_scatter": (True, "reduce_scatter")}


def _run(rank, world_size):
    from dist_train.noise_scale import GradientNoiseScale

    out = {}
    for name, (shard, reduction) in LAYOUTS.items():
        options = {"sharded_reduction": reduction} if shard else {}
        # 32 then 48 samples: 2 then 3 micro-steps of 8 per rank.
        trainer = make_trainer(rank, world_size, batches=global_batches(3, [32, 32, 48]) + global_batches(3, 48, seed=2),
                               micro=8, optim=RADAM_LA, shard=shard, backend_options=options,
                               noise=GradientNoiseScale(ema_decay=0.5))
        trainer.backend.enable_noise_scale()
        trainer.cfg = replace(trainer.cfg, grad_clip_norm=0.5)
        norms, noise = [], []
        for _ in range(6):
            trainer.train_step(trainer._schedule_state())
            norms.append(float(trainer._window.grad_norm))
            noise.append((trainer.noise.grad_sq_norm, trainer.noise.trace_cov))
        out[name] = {"params": params_of(trainer), "norms": norms, "noise": noise,
                     "optimizer": type(trainer.backend.optimizer).__name__,
                     "hook": trainer.backend._reduce_scatter}
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_run, world_size=2)


def test_the_layouts_are_what_they_say(ranks):
    for out in ranks:
        assert [out[k]["optimizer"] for k in LAYOUTS] == ["Lookahead", "ShardedOptimizer", "ShardedOptimizer"]
        assert [out[k]["hook"] for k in LAYOUTS] == [False, False, True]


@pytest.mark.parametrize("layout", ["all_reduce", "reduce_scatter"])
def test_sharded_steps_match_the_replicated_step(ranks, layout):
    for out in ranks:
        ref, ours = out["replicated"], out[layout]
        assert max(ref["norms"]) > 0.5  # the clip bites at least once
        torch.testing.assert_close(ours["params"], ref["params"], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours["norms"], ref["norms"], rtol=1e-5, atol=0)
        # |G|^2 is a difference of two squared norms near 2: float32 rounding of those, not of |G|^2, sets atol.
        torch.testing.assert_close(ours["noise"], ref["noise"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0][layout]["params"], ranks[1][layout]["params"], rtol=0, atol=0)
