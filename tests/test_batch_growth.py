"""Batch growth at run time on 2 gloo ranks: exact sample counts, no hang, same parameters as one process."""

import torch

from dist_train.optim.config import LookaheadConfig, OptimConfig
from dist_train.schedule import Schedule, ScheduleConfig
from harness import global_batches, make_trainer, params_of
from multiproc import run_ranks

DATASET_SIZE = 64  # "epochs" of 64 samples: B grows 16 -> 32 at epoch 1 and 32 -> 64 at epoch 2
SCHEDULE = ScheduleConfig(mode="increase_batch", milestones_epochs=(1.0, 2.0), factor=2.0)
EXPECTED_SIZES = [16, 16, 16, 16, 32, 32, 64, 64]
RADAM_LA = OptimConfig(name="radam", lr=0.01, momentum=0.9, weight_decay=1e-4,
                       lookahead=LookaheadConfig(k=3, alpha=0.5))


def _schedule(world_size, micro):
    return Schedule(SCHEDULE, base_lr=0.01, base_momentum=0.9, base_global_batch_size=16,
                    dataset_size=DATASET_SIZE, optimizer_family="normalized", batch_granularity=micro * world_size)


def _run(rank, world_size, micro):
    batches = global_batches(len(EXPECTED_SIZES), EXPECTED_SIZES, seed=5)
    trainer = make_trainer(rank, world_size, batches=batches, micro=micro, optim=RADAM_LA,
                           schedule=_schedule(world_size, micro))
    sizes, accum = [], []
    for _ in EXPECTED_SIZES:
        state = trainer.schedule.state_at(trainer.progress.samples_seen)
        before = trainer.progress.micro_batches
        trainer.train_step(state)
        sizes.append(state.global_batch_size)
        # Samples this step actually drew from the stream, summed over ranks.
        drawn = torch.tensor([(trainer.progress.micro_batches - before) * micro])
        trainer.backend.all_reduce(drawn)
        accum.append((trainer.backend.accum_steps, int(drawn)))
    return params_of(trainer), sizes, accum, trainer.progress.samples_seen


def test_batch_grows_twice_on_two_ranks_and_matches_one_process():
    ref_params, ref_sizes, _, _ = run_ranks(_run, 8, world_size=1)[0]
    outs = run_ranks(_run, 4, world_size=2, timeout_s=300)  # a hang would time out here
    for params, sizes, accum, seen in outs:
        assert sizes == ref_sizes == EXPECTED_SIZES
        # micro 4 x 2 ranks: 2, 4 then 8 accumulation steps, and every step drew exactly B samples.
        assert accum == [(b // 8, b) for b in EXPECTED_SIZES]
        assert seen == sum(EXPECTED_SIZES)
        torch.testing.assert_close(params, ref_params, rtol=0, atol=1e-6)
