"""The WebDataset reader: exact-once evaluation across ranks, and equal training streams on uneven shards."""

from collections import Counter

import torch
from multiproc import run_ranks

from dist_train.config import DataConfig
from dist_train.data.loader import eval_batches, train_batches
from dist_train.data.shards import read_manifest


def _eval_keys_on_rank(rank, world_size, shards, num_workers):
    manifest = read_manifest(shards)
    cfg = DataConfig(shards=str(shards), num_workers=num_workers)
    labels, count = [], 0
    for batch in eval_batches(manifest, cfg, micro_batch_size=32, rank=rank, world_size=world_size):
        labels += batch["label"].tolist()
        count += len(batch["label"])
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (1, 28, 28)
    return count, labels


def test_every_test_sample_is_evaluated_exactly_once_across_two_ranks(small_shards):
    manifest = read_manifest(small_shards)
    outs = run_ranks(_eval_keys_on_rank, small_shards, 2, world_size=2)
    counts = [c for c, _ in outs]
    assert sum(counts) == manifest["splits"]["test"]["num_samples"] == 300
    assert all(c > 0 for c in counts)  # both ranks did part of the work
    # Same multiset of labels as a single-process pass: no sample twice, none missing.
    single = run_ranks(_eval_keys_on_rank, small_shards, 1, world_size=1)[0][1]
    assert Counter(outs[0][1] + outs[1][1]) == Counter(single)


def _train_batches_on_rank(rank, world_size, shards, n_batches):
    import torch.distributed as dist

    manifest = read_manifest(shards)
    cfg = DataConfig(shards=str(shards), num_workers=2, shuffle_buffer=100)
    it = iter(train_batches(manifest, cfg, micro_batch_size=16, rank=rank, world_size=world_size, seed=3))
    labels = []
    for step in range(n_batches):
        batch = next(it)
        assert batch["image"].shape == (16, 1, 28, 28)
        labels.append(batch["label"])
        # A collective per batch: if one rank ran dry the other would hang here (and the test time out).
        dist.all_reduce(torch.ones(1))
    return torch.cat(labels)


def test_both_ranks_get_equal_training_batches_with_uneven_shards(small_shards):
    manifest = read_manifest(small_shards)
    sizes = [s["num_samples"] for s in manifest["splits"]["train"]["shards"]]
    per_rank = [sum(sizes[0::2]), sum(sizes[1::2])]
    assert per_rank[0] > 1.4 * per_rank[1], f"the fixture must split unevenly over 2 ranks: {per_rank}"
    # Ask for far more than one pass over either rank's shards (100 x 16 = 1600 > 602).
    outs = run_ranks(_train_batches_on_rank, small_shards, 100, world_size=2, timeout_s=240)
    assert [len(o) for o in outs] == [1600, 1600]
    assert not torch.equal(outs[0], outs[1])  # ranks read different data


def test_training_stream_is_reproducible_for_a_seed(small_shards):
    a = run_ranks(_train_batches_on_rank, small_shards, 20, world_size=1)[0]
    b = run_ranks(_train_batches_on_rank, small_shards, 20, world_size=1)[0]
    assert torch.equal(a, b)


def test_loader_workers_die_with_a_killed_rank():
    # A rank killed outright cannot stop its workers, and they ignore SIGTERM (it is the rank's signal). A
    # worker busy in the pipeline (here: asleep after its first sample, as on a stalled shard read) does not
    # notice its parent's death by itself; an orphan would hold the rank's stdout and stderr open, and
    # torchrun's caller would wait on it forever.
    import os
    import signal
    import subprocess
    import sys
    import time

    script = """
import os, time, torch
from dist_train.data.loader import _loader
class Stalls(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(1)
        time.sleep(600)
batches = iter(_loader(Stalls(), 2, seed=0))
next(batches)
print(" ".join(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()), flush=True)
time.sleep(600)
"""
    rank = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = [int(pid) for pid in rank.stdout.readline().split()]
    assert len(workers) == 2
    rank.kill()
    rank.wait(timeout=30)
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
                 "State:\tZ" not in open(f"/proc/{pid}/status").read()]
    for pid in alive:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"loader workers {alive} outlived their killed rank"


def test_a_worker_whose_rank_died_before_it_could_ask_for_the_signal_kills_itself():
    # The race behind a CI failure: the rank is killed while a worker is still starting, before the worker's
    # prctl(PR_SET_PDEATHSIG). The kernel never signals it then; the worker must see that its parent changed.
    import signal
    import subprocess
    import sys

    code = ("import os; from dist_train.data.loader import _die_with_parent; "
            "_die_with_parent(os.getppid() + 1_000_000); print('survived')")  # a parent that is not ours
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout
    ok = subprocess.run([sys.executable, "-c", code.replace(" + 1_000_000", "")], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "survived"  # with its real parent it lives on
