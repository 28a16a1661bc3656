"""Batch growth at run time on 2 gloo ranks: exact sample counts, no hang, same parameters as one process."""

import torch
from harness import global_batches, make_trainer, params_of
from multiproc import run_ranks

from dist_train.optim.config import LookaheadConfig, OptimConfig
from dist_train.schedule import Schedule, ScheduleConfig

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
        before = trainer.parts.train_data.drawn
        trainer.train_step(state)
        sizes.append(state.global_batch_size)
        # Samples this step actually drew from the stream, summed over ranks.
        drawn = torch.tensor([(trainer.parts.train_data.drawn - before) * micro])
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


def _adaptive(rank, world_size):
    from dist_train.noise_scale import GradientNoiseScale
    from dist_train.schedule import AdaptiveConfig, BatchSizeController, NoiseScaleConfig

    cfg = ScheduleConfig(mode="adaptive", max_global_batch_size=64, noise_scale=NoiseScaleConfig(enabled=True),
                         adaptive=AdaptiveConfig(growth_factor=2.0, margin=1.0, min_steps_between_growths=3))
    schedule = Schedule(cfg, base_lr=0.01, base_momentum=0.9, base_global_batch_size=16, dataset_size=10_000,
                        optimizer_family="normalized", batch_granularity=8 * world_size)
    # Random labels: the gradient is mostly noise, so B_simple is far above any batch here.
    batches = global_batches(12, 64, seed=9)
    controller = BatchSizeController(cfg.adaptive, start_global_batch_size=16, max_global_batch_size=64,
                                     batch_granularity=8 * world_size)
    trainer = make_trainer(rank, world_size, batches=batches, micro=8, optim=RADAM_LA, schedule=schedule,
                           noise=GradientNoiseScale(ema_decay=0.5), batch_controller=controller)
    trainer.backend.enable_noise_scale()
    sizes = []
    for _ in range(10):
        state = trainer._schedule_state()
        before = trainer.progress.samples_seen
        flags = trainer.train_step(state)
        trainer._after_step(state, flags)  # the decision came back with the step's flags
        assert trainer.progress.samples_seen - before == state.global_batch_size
        sizes.append(state.global_batch_size)
    return sizes, trainer.noise.b_simple


def test_adaptive_mode_grows_the_batch_from_the_measured_noise_scale_on_two_ranks():
    outs = run_ranks(_adaptive, world_size=2)
    (sizes, b_simple), (sizes_1, _) = outs
    assert sizes == sizes_1  # both ranks take the same decisions
    print("adaptive batch sizes:", sizes, "B_simple:", b_simple)
    assert sizes[:3] == [16, 16, 16] and sizes[3] == 32  # first decision after 3 steps: B_simple >> 16
    changes = [i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]]
    assert all(sizes[i] == 2 * sizes[i - 1] for i in changes)  # by the growth factor
    assert all(b - a >= 3 for a, b in zip(changes, changes[1:]))  # at most once every 3 steps
    assert max(sizes) <= 64 and len(changes) >= 1
