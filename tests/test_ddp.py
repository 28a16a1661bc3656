"""DDP on 2 gloo ranks, and gradient accumulation, against one process on the same global batches."""

import torch
from harness import global_batches, make_trainer, params_of
from multiproc import run_ranks

from dist_train.optim.config import OptimConfig

SGD = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)


def _train(rank, world_size, batches, micro, optim, steps):
    trainer = make_trainer(rank, world_size, batches=batches, micro=micro, optim=optim)
    losses = []
    for _ in range(steps):
        trainer.train_step(trainer.schedule.state_at(trainer.progress.samples_seen))
        losses.append(trainer.collect_train_metrics()["train/loss"])
    return params_of(trainer), losses, trainer.progress.samples_seen


def test_two_ranks_match_one_process_on_the_same_global_batch():
    batches = global_batches(3, 32)
    ref_params, ref_losses, _ = run_ranks(_train, batches, 32, SGD, 3, world_size=1)[0]
    outs = run_ranks(_train, batches, 16, SGD, 3, world_size=2)
    for params, losses, seen in outs:
        torch.testing.assert_close(params, ref_params, rtol=0, atol=1e-6)
        assert seen == 96
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    assert torch.equal(outs[0][0], outs[1][0])  # the ranks agree exactly with each other
    # The test can fail: one step changes the parameters far beyond the tolerance.
    start = run_ranks(_train, batches, 32, SGD, 0, world_size=1)[0][0]
    assert (start - ref_params).abs().max() > 1e-3


def test_four_accumulation_steps_of_8_equal_one_micro_batch_of_32():
    batches = global_batches(2, 32)
    whole = run_ranks(_train, batches, 32, SGD, 2, world_size=1)[0]
    accumulated = run_ranks(_train, batches, 8, SGD, 2, world_size=1)[0]
    torch.testing.assert_close(accumulated[0], whole[0], rtol=0, atol=1e-6)


def test_accumulation_on_two_ranks_skips_the_all_reduce_until_the_last_micro_step():
    # 2 ranks x 2 micro-steps of 8 = 32: matches the single-process reference only if the
    # no_sync micro-step's gradient is kept and averaged once at the end.
    batches = global_batches(2, 32)
    whole = run_ranks(_train, batches, 32, SGD, 2, world_size=1)[0]
    outs = run_ranks(_train, batches, 8, SGD, 2, world_size=2)
    for params, _, _ in outs:
        torch.testing.assert_close(params, whole[0], rtol=0, atol=1e-6)


def _bf16_losses(rank, world_size, precision):
    batches = global_batches(1, 32) * 12  # the same batch again and again: the loss must fall
    trainer = make_trainer(rank, world_size, batches=batches, micro=16, optim=SGD,
                           backend_options={"precision": precision})
    losses = []
    for _ in range(12):
        trainer.train_step(trainer.schedule.state_at(trainer.progress.samples_seen))
        losses.append(trainer.collect_train_metrics()["train/loss"])
    return losses


def test_bf16_autocast_on_two_ranks_trains():
    bf16 = run_ranks(_bf16_losses, "bf16", world_size=2)[0]
    fp32 = run_ranks(_bf16_losses, "fp32", world_size=2)[0]
    assert bf16[-1] < 0.5 * bf16[0]
    assert bf16 != fp32  # autocast really ran the forward in bf16
    assert abs(bf16[-1] - fp32[-1]) < 0.1 * fp32[0]
