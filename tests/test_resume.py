"""Resume is exact: an interrupted and resumed run gives the uninterrupted run's losses, bit for bit."""

import json
import math
import os

import pytest
import torch
from harness import global_batches, make_trainer, params_of
from harness import train_losses as _losses
from multiproc import run_ranks

from dist_train.checkpoint import Checkpointer, CheckpointError
from dist_train.optim.config import LookaheadConfig, OptimConfig

RADAM_LA = OptimConfig(name="radam", lr=0.01, momentum=0.9, weight_decay=1e-4,
                       lookahead=LookaheadConfig(k=3, alpha=0.5))
SIZES = [16, 16, 16, 16, 32, 32, 32, 32]  # the batch grows between the checkpoint and the end


def _uninterrupted(rank, world_size, run_dir, shard):
    trainer = make_trainer(rank, world_size, batches=global_batches(8, SIZES), micro=4, optim=RADAM_LA,
                           shard=shard, run_dir=run_dir)
    return _losses(trainer, 8), params_of(trainer)


def _interrupted(rank, world_size, run_dir, shard, stop_at):
    batches = global_batches(8, SIZES)
    first = make_trainer(rank, world_size, batches=batches, micro=4, optim=RADAM_LA, shard=shard, run_dir=run_dir)
    before = _losses(first, stop_at)
    first.save_checkpoint()
    # A fresh trainer (new model, optimizer, data stream) picks up from the checkpoint.
    second = make_trainer(rank, world_size, batches=batches, micro=4, optim=RADAM_LA, shard=shard,
                          run_dir=run_dir)
    second.load_checkpoint(second.checkpointer.latest_valid())
    return before + _losses(second, 8 - stop_at), params_of(second)


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_two_rank_resume_in_the_middle_of_a_lookahead_cycle_is_bit_exact(tmp_path, shard):
    ref = run_ranks(_uninterrupted, str(tmp_path / "a"), shard, world_size=2)
    # Step 5 is inside the second k=3 Lookahead cycle, and before the batch change at step 5.
    got = run_ranks(_interrupted, str(tmp_path / "b"), shard, 4, world_size=2)
    for (ref_losses, ref_params), (losses, params) in zip(ref, got):
        assert losses == ref_losses  # bit-exact, not approximately
        assert torch.equal(params, ref_params)


# --- on real shards, through the real data stream ----------------------------------------------------------
REAL_SIZES = [32] * 6 + [64] * 12  # 960 samples of small_shards' 1,003: the batch doubles after step 6


class _Recorded:
    """A TrainStream that remembers the dataset index of every sample it hands to the trainer."""

    def __init__(self, stream):
        self.stream, self.indices = stream, []

    def __iter__(self):
        for batch in self.stream:
            self.indices += batch["index"].tolist()
            yield batch

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def _real_trainer(rank, world_size, shards, run_dir):
    from dist_train.config import DataConfig
    from dist_train.data.loader import TrainStream
    from dist_train.data.shards import read_manifest

    cfg = DataConfig(shards=str(shards), num_workers=2, shuffle_buffer=100)
    data = _Recorded(TrainStream(read_manifest(shards), cfg, micro_batch_size=8, rank=rank, world_size=world_size,
                                 seed=11))
    sizes_only = [{"label": torch.zeros(b)} for b in REAL_SIZES]  # the harness takes the step sizes from these
    return make_trainer(rank, world_size, batches=sizes_only, micro=8, optim=RADAM_LA, run_dir=run_dir,
                        train_data=data)


def _real_run(rank, world_size, shards, run_dir, stop_at):
    trainer = _real_trainer(rank, world_size, shards, run_dir)
    losses = _losses(trainer, stop_at or len(REAL_SIZES))
    indices = list(trainer.parts.train_data.indices)
    if stop_at:
        trainer.save_checkpoint()
        trainer = _real_trainer(rank, world_size, shards, run_dir)
        trainer.load_checkpoint(trainer.checkpointer.latest_valid())
        losses += _losses(trainer, len(REAL_SIZES) - stop_at)
        indices += trainer.parts.train_data.indices
    return losses, params_of(trainer), indices


def test_two_ranks_on_real_shards_resume_mid_epoch_after_the_batch_grew_bit_exactly(small_shards, tmp_path):
    ref = run_ranks(_real_run, small_shards, str(tmp_path / "a"), 0, world_size=2, timeout_s=300)
    # Step 9: the batch has doubled (after step 6) and the epoch is 38% done (384 of 1,003 samples).
    got = run_ranks(_real_run, small_shards, str(tmp_path / "b"), 9, world_size=2, timeout_s=300)
    for (ref_losses, ref_params, ref_indices), (losses, params, indices) in zip(ref, got):
        assert losses == ref_losses and torch.equal(params, ref_params)
        assert indices == ref_indices
    # Within the epoch and across the batch change, the two ranks drew 960 of its 1,003 samples, none twice.
    drawn = ref[0][2] + ref[1][2]
    assert len(drawn) == sum(REAL_SIZES) == 960 and len(set(drawn)) == 960


# --- elastic: a checkpoint of one world size resumed on another ---------------------------------------------
def _real_elastic(rank, world_size, shards, run_dir, steps, resume):
    trainer = _real_trainer(rank, world_size, shards, run_dir)
    if resume:
        trainer.load_checkpoint(trainer.checkpointer.choose_resume())
    losses = _losses(trainer, steps)
    if not resume:
        trainer.save_checkpoint()
    return trainer.parts.train_data.indices, losses


def test_real_shards_resumed_on_one_rank_after_two_continue_the_epoch_without_a_gap_or_a_repeat(small_shards,
                                                                                               tmp_path):
    # 9 steps on 2 ranks (384 samples, the batch doubled at step 6), then the rest of the 960 on 1 rank: the
    # data position is re-dealt to the new rank, and the epoch reads on.
    before = run_ranks(_real_elastic, small_shards, str(tmp_path), 9, False, world_size=2, timeout_s=300)
    (after, losses), = run_ranks(_real_elastic, small_shards, str(tmp_path), len(REAL_SIZES) - 9, True, world_size=1,
                                 timeout_s=300)
    drawn = before[0][0] + before[1][0] + after
    # Within the first epoch of 1,003, no sample twice across the change (that the rest of an epoch is read in
    # full after a redeal is test_order.py's property test).
    assert len(drawn) == len(set(drawn)) == 960
    assert all(math.isfinite(v) for v in losses)



ELASTIC_STEPS, ELASTIC_STOP = 8, 4  # step 4: inside the second k=3 Lookahead cycle


def _backend(spec: str) -> dict:
    """make_trainer's arguments for ``ddp``, ``zero1`` or ``zero2``."""
    if spec == "ddp":
        return {"backend": "ddp"}
    return {"backend": "deepspeed", "backend_options": {"zero_stage": int(spec[-1])}}


def _elastic_first(rank, world_size, run_dir, shard, backend="ddp"):
    trainer = make_trainer(rank, world_size, batches=global_batches(ELASTIC_STEPS, 96), micro=16, optim=RADAM_LA,
                           shard=shard, run_dir=run_dir, **_backend(backend))
    losses = _losses(trainer, ELASTIC_STOP)
    trainer.save_checkpoint()
    return losses


def _elastic_second(rank, world_size, run_dir, shard, backend="ddp"):
    trainer = make_trainer(rank, world_size, batches=global_batches(ELASTIC_STEPS, 96), micro=16, optim=RADAM_LA,
                           shard=shard, run_dir=run_dir, **_backend(backend))
    trainer.load_checkpoint(trainer.checkpointer.choose_resume())
    return _losses(trainer, ELASTIC_STEPS - ELASTIC_STOP), params_of(trainer), trainer.backend.accum_steps


def _elastic_reference(rank, world_size, shard):
    trainer = make_trainer(rank, world_size, batches=global_batches(ELASTIC_STEPS, 96), micro=16, optim=RADAM_LA,
                           shard=shard)
    return _losses(trainer, ELASTIC_STEPS), params_of(trainer)


# The whole matrix for DDP with sharded state; DeepSpeed (slow to start) once shrinking, once growing to an
# uneven split (B=96 at micro 16 over 3 ranks: ZeRO's flat groups then end in padding).
@pytest.mark.parametrize("shard, before, after, backend",
                         [(True, 2, 1, "ddp"), (True, 1, 2, "ddp"), (True, 2, 3, "ddp"), (False, 2, 1, "ddp"),
                          (False, 2, 1, "zero2"), (False, 2, 3, "zero1")],
                         ids=["sharded-2to1", "sharded-1to2", "sharded-2to3", "replicated-2to1", "zero2-2to1",
                              "zero1-2to3"])
def test_a_checkpoint_resumes_on_another_number_of_ranks_and_continues_the_run(tmp_path, shard, before, after,
                                                                                backend):
    # B=96 with micro 16 divides over 1, 2 and 3 ranks. Every world size sees the same global batches, so the
    # losses agree up to the order of floating-point sums (the all-reduce over 2 or 3 ranks adds the same
    # gradients in another order): rtol 1e-5, not bit for bit. The reference is one DDP rank: DeepSpeed
    # matches DDP to that tolerance (test_deepspeed.py), with Lookahead mid-cycle at the checkpoint.
    (ref_losses, ref_params), *_ = run_ranks(_elastic_reference, shard, world_size=1)
    first = run_ranks(_elastic_first, str(tmp_path), shard, backend, world_size=before, timeout_s=300)[0]
    second = run_ranks(_elastic_second, str(tmp_path), shard, backend, world_size=after, timeout_s=300)
    for losses, params, accum_steps in second:
        assert accum_steps == 96 // (16 * after)  # accumulation follows the new world size
        assert first + losses == pytest.approx(ref_losses, rel=1e-5)
        assert torch.allclose(params, ref_params, rtol=1e-4, atol=1e-6)


def _bf16_zero2(rank, world_size, run_dir, resume):
    trainer = make_trainer(rank, world_size, batches=global_batches(ELASTIC_STEPS, 96), micro=16, optim=RADAM_LA,
                           run_dir=run_dir, backend="deepspeed", backend_options={"zero_stage": 2, "precision": "bf16"})
    if not resume:
        _losses(trainer, 2)
        return str(trainer.save_checkpoint())
    trainer.load_checkpoint(trainer.checkpointer.choose_resume())
    return [t.detach().clone() for t in trainer.backend._engine.optimizer.single_partition_of_fp32_groups]


def test_deepspeed_fp32_master_weights_survive_a_world_size_change_in_bf16(tmp_path):
    from dist_train.checkpoint import weights_only_loading

    path = run_ranks(_bf16_zero2, str(tmp_path), False, world_size=2, timeout_s=300)[0]
    (resumed,) = run_ranks(_bf16_zero2, str(tmp_path), True, world_size=1, timeout_s=300)
    with weights_only_loading("test"):
        saved = [torch.load(f"{path}/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=True)
                 ["optimizer_state_dict"]["single_partition_of_fp32_groups"] for r in range(2)]
    for i, partition in enumerate(resumed):  # one rank now: its partition is the whole group
        whole = torch.cat([ranks[i] for ranks in saved])
        assert torch.equal(partition[:whole.numel()], whole)
        # DeepSpeed's own fallback at another world size refreshes them from the bf16 module: not the same
        assert not torch.equal(whole.bfloat16().float(), whole)


def _elastic_indivisible(rank, world_size, run_dir, later=32, backend="ddp"):
    # The first 4 steps as written (B=96); from the resumed step on, this run's schedule says B=`later`.
    batches = global_batches(ELASTIC_STEPS, [96] * ELASTIC_STOP + [later] * (ELASTIC_STEPS - ELASTIC_STOP))
    trainer = make_trainer(rank, world_size, batches=batches, micro=16, optim=RADAM_LA, run_dir=run_dir,
                           **_backend(backend))
    try:
        trainer.load_checkpoint(trainer.checkpointer.choose_resume())
    except CheckpointError as err:
        return str(err)
    return None


def test_resuming_where_the_batch_does_not_divide_over_the_new_ranks_says_so(tmp_path):
    run_ranks(_elastic_first, str(tmp_path), False, world_size=1)
    errors = run_ranks(_elastic_indivisible, str(tmp_path), world_size=3)
    assert all(e and "cannot resume" in e and "not divisible by" in e and "16 x 3 = 48" in e for e in errors)


def test_deepspeed_zero0_refuses_another_world_size_with_the_fix(tmp_path):
    # ZeRO-1/2 re-cut their partitions (above); ZeRO-0 at another world size is untested, so refused.
    run_ranks(_elastic_first, str(tmp_path), False, "zero0", world_size=2, timeout_s=300)
    error, = run_ranks(_elastic_indivisible, str(tmp_path), 96, "zero0", world_size=1, timeout_s=300)
    assert "cannot change the world size on resume; relaunch with 2 ranks" in error


def _resume_with_a_stale_listing_on_rank_1(rank, world_size, run_dir):
    batches = global_batches(4, 16)
    first = make_trainer(rank, world_size, batches=batches, micro=4, optim=RADAM_LA, run_dir=run_dir)
    for _ in range(3):
        first.train_step(first.schedule.state_at(first.progress.samples_seen))
        first.save_checkpoint()  # keep_last=2: steps 2 and 3 remain
    second = make_trainer(rank, world_size, batches=batches, micro=4, optim=RADAM_LA, run_dir=run_dir)
    if rank == 1:  # this rank's directory listing lags behind, as NFS's attribute cache can make it
        stale = second.checkpointer.paths()[:-1]
        second.checkpointer.paths = lambda: stale
    chosen = second.checkpointer.choose_resume()
    second.load_checkpoint(chosen)
    own_view = second.checkpointer.latest_valid()
    return chosen.name, own_view.name, second.progress.step


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose_even_with_a_stale_listing(tmp_path):
    (chosen0, view0, step0), (chosen1, view1, step1) = run_ranks(_resume_with_a_stale_listing_on_rank_1,
                                                                 str(tmp_path), world_size=2)
    assert view1 == "step-00000002" != view0 == "step-00000003"  # on its own, rank 1 would load step 2
    assert chosen0 == chosen1 == "step-00000003" and step0 == step1 == 3


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep_last=3, rank=0, world_size=1)
    for step in (1, 2):
        ckpt.save(step=step, states={"progress": _Counter(step)},
                  save_backend=lambda d: torch.save({"w": torch.ones(1000)}, d / "backend.pt"))
    latest = tmp_path / "step-00000002" / "backend.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    assert ckpt.latest_valid() == tmp_path / "step-00000001"
    assert "does not match its checksum" in caplog.text and "falling back" in caplog.text


def test_keep_last_and_no_partial_checkpoint_is_ever_visible(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    for step in range(1, 5):
        ckpt.save(step=step, states={}, save_backend=lambda d: None)
    assert [p.name for p in ckpt.paths()] == ["step-00000003", "step-00000004"]
    # A crash mid-save leaves only a temporary directory, which is never taken for a checkpoint.
    (tmp_path / ".step-00000005.tmp").mkdir()
    (tmp_path / "step-00000006").mkdir()  # no manifest: unfinished
    assert ckpt.latest_valid() == tmp_path / "step-00000004"


class _Counter:
    """The smallest Stateful."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])


def test_the_checkpointer_saves_and_loads_a_named_set_of_parts_strictly(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1, rank=0, world_size=1)
    path = ckpt.save(step=1, states={"progress": _Counter(7), "noise": _Counter(3)}, save_backend=lambda d: None)
    progress, noise = _Counter(), _Counter()
    ckpt.load_states(path, {"progress": progress, "noise": noise})
    assert (progress.n, noise.n) == (7, 3)
    # A run that no longer measures the noise scale cannot take this checkpoint silently, nor the reverse.
    for states in ({"progress": _Counter()}, {"progress": _Counter(), "noise": _Counter(), "batch_controller": _Counter()}):
        with pytest.raises(CheckpointError, match="holds the parts"):
            ckpt.load_states(path, states)



def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1, rank=0, world_size=1)
    path = ckpt.save(step=1, states={}, save_backend=lambda d: None)
    torch.save({"evil": os.system}, path / "rank-0.pt")  # a pickled callable
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["rank-0.pt"] = {"sha256": __import__("hashlib").sha256((path / "rank-0.pt").read_bytes())
                                      .hexdigest(), "bytes": (path / "rank-0.pt").stat().st_size}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt.load_rank_state(path)


def _model_mismatch(rank, world_size, run_dir):
    from torch import nn

    trainer = make_trainer(rank, world_size, batches=global_batches(1, 16), micro=4, optim=RADAM_LA,
                           run_dir=run_dir)
    _losses(trainer, 1)
    trainer.save_checkpoint()
    other = make_trainer(rank, world_size, batches=global_batches(1, 16), micro=4, optim=RADAM_LA, run_dir=run_dir,
                         model_fn=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    try:
        other.load_checkpoint(other.checkpointer.latest_valid())
    except CheckpointError as err:
        return str(err)
    return "loaded"


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    (message,) = run_ranks(_model_mismatch, str(tmp_path), world_size=1)
    assert "does not fit this run's model or optimizer" in message and "new train.run_dir" in message
