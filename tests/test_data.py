"""The shard reader: true epochs over ranks and workers, a position that resumes in constant time, remote
shards, and evaluation that counts every sample once for any number of ranks and workers."""

import math
import sys
import time
from collections import Counter

import pytest
import torch
from conftest import write_fmnist_subset
from multiproc import run_ranks

from dist_train.config import DataConfig
from dist_train.data.errors import ShardsNotFound
from dist_train.data.loader import TrainStream, eval_batches
from dist_train.data.reader import ShardReadError, load_manifest
from dist_train.data.shards import MANIFEST_NAME, read_manifest


@pytest.fixture(scope="module")
def three_eval_shards(tmp_path_factory):
    """203 training images in 2 shards and 301 test images in 3 shards."""
    out = tmp_path_factory.mktemp("fmnist_three_eval")
    write_fmnist_subset(out, n_train=203, n_test=301, samples_per_shard=101)
    return out


def _eval_indices_on_rank(rank, world_size, shards, num_workers, micro=32):
    manifest = read_manifest(shards)
    cfg = DataConfig(shards=str(shards), num_workers=num_workers)
    indices, labels = [], []
    for batch in eval_batches(manifest, cfg, micro_batch_size=micro, rank=rank, world_size=world_size):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (1, 28, 28)
        indices += batch["index"].tolist()
        labels += batch["label"].tolist()
    return indices, labels


def test_every_test_sample_is_evaluated_exactly_once_across_two_ranks(small_shards):
    outs = run_ranks(_eval_indices_on_rank, small_shards, 2, world_size=2)
    assert sorted(outs[0][0] + outs[1][0]) == list(range(300)) and all(o[0] for o in outs)
    # The same labels for the same samples as a single-process pass.
    alone, alone_labels = _eval_indices_on_rank(0, 1, small_shards, 1)
    by_index = dict(zip(alone, alone_labels))
    assert all(by_index[i] == lab for o in outs for i, lab in zip(*o))


@pytest.mark.parametrize("world_size, num_workers", [(3, 0), (2, 2)], ids=["3-ranks-2-shards", "2x2-over-3-shards"])
def test_evaluation_counts_every_sample_once_with_more_streams_than_shards(small_shards, three_eval_shards,
                                                                           world_size, num_workers):
    shards = small_shards if world_size == 3 else three_eval_shards  # 2 and 3 evaluation shards
    n = read_manifest(shards)["splits"]["test"]["num_samples"]
    # A rank's share is a function of (rank, world size) alone: the ranks run one after another here.
    seen = [i for rank in range(world_size) for i in _eval_indices_on_rank(rank, world_size, shards, num_workers)[0]]
    assert Counter(seen) == Counter(range(n))


def test_evaluation_with_more_ranks_than_samples_gives_the_idle_ranks_nothing(three_eval_shards):
    seen = [i for rank in range(400) for i in _eval_indices_on_rank(rank, 400, three_eval_shards, 0, 8)[0]]
    assert sorted(seen) == list(range(301))


def _indices_per_rank(rank, world_size, shards, micro_batches, num_workers=2, shuffle_buffer=100, seed=3,
                      micro=16):
    import torch.distributed as dist

    cfg = DataConfig(shards=str(shards), num_workers=num_workers, shuffle_buffer=shuffle_buffer)
    stream = iter(TrainStream(read_manifest(shards), cfg, micro_batch_size=micro, rank=rank, world_size=world_size,
                              seed=seed))
    indices = []
    for _ in range(micro_batches):
        batch = next(stream)
        assert batch["image"].shape == (micro, 1, 28, 28) and int(batch["bad_samples"]) == 0
        indices += batch["index"].tolist()
        # A collective per batch: if one rank ran dry the other would hang here (and the test time out).
        dist.all_reduce(torch.ones(1))
    return indices


def test_two_ranks_by_two_workers_read_every_training_sample_once_per_epoch(small_shards):
    n, per_round = 1003, 2 * 16  # samples; samples per micro-batch round of both ranks
    ranks = run_ranks(_indices_per_rank, small_shards, math.ceil(3 * n / per_round), world_size=2, timeout_s=240)
    for epochs in (1, 3):
        # Up to the last partial micro-batch, no sample more than `epochs` times...
        under = Counter(i for r in ranks for i in r[:epochs * n // per_round * 16])
        assert max(under.values()) == epochs and under.total() == epochs * n // per_round * per_round
        # ...and one micro-batch round later, every sample `epochs` times; only that round reaches further.
        over = Counter(i for r in ranks for i in r[:math.ceil(epochs * n / per_round) * 16])
        assert set(over) == set(range(n)) and min(over.values()) == epochs
        assert over.total() - epochs * n < per_round


def test_both_ranks_get_equal_training_batches_with_uneven_shards(small_shards):
    manifest = read_manifest(small_shards)
    sizes = [s["num_samples"] for s in manifest["splits"]["train"]["shards"]]
    assert len(set(sizes)) > 1, f"the fixture must have uneven shards: {sizes}"
    # Far more than one pass, with fewer shards (5) than ranks x workers x 2.
    outs = run_ranks(_indices_per_rank, small_shards, 100, 3, world_size=2, timeout_s=240)
    assert [len(o) for o in outs] == [1600, 1600] and not set(outs[0][:400]) & set(outs[1][:400])


def _first_indices(shards, n=20, **kw):
    it = iter(_stream(shards, **kw))
    return [i for _ in range(n) for i in next(it)["index"].tolist()]


def test_training_stream_is_reproducible_for_a_seed_and_differs_across_seeds(small_shards):
    assert _first_indices(small_shards) == _first_indices(small_shards) != _first_indices(small_shards, seed=4)


def _stream(shards, *, num_workers=2, micro=16, world_size=1, rank=0, shard_url="", shuffle_buffer=100, seed=3):
    cfg = DataConfig(shards=str(shards), num_workers=num_workers, shuffle_buffer=shuffle_buffer, shard_url=shard_url)
    return TrainStream(load_manifest(cfg.shards, cfg.shard_url), cfg, micro_batch_size=micro, rank=rank,
                       world_size=world_size, seed=seed)


@pytest.mark.parametrize("stop_at", [5, 70], ids=["mid-epoch", "third-epoch"])
def test_a_restored_stream_continues_exactly_where_the_saved_one_stood(small_shards, stop_at):
    whole = _stream(small_shards)
    batches = iter(whole)
    drawn = [next(batches) for _ in range(stop_at + 6)]
    first = _stream(small_shards)
    early = iter(first)
    for _ in range(stop_at):
        next(early)
    state = first.state_dict()
    del early
    resumed = _stream(small_shards)
    resumed.load_state_dict(state)
    after = iter(resumed)
    for expected in drawn[stop_at:]:
        got = next(after)
        assert torch.equal(got["index"], expected["index"]) and torch.equal(got["image"], expected["image"])


def test_a_position_saved_with_other_workers_reads_the_rest_of_the_epoch_once(small_shards):
    saved = _stream(small_shards, num_workers=2)
    it = iter(saved)
    before = [i for _ in range(20) for i in next(it)["index"].tolist()]  # 320 of 1,003
    del it
    moved = _stream(small_shards, num_workers=3)
    moved.load_state_dict(saved.state_dict())
    it = iter(moved)
    after = [i for _ in range(math.ceil((1003 - 320) / 16)) for i in next(it)["index"].tolist()]
    counts = Counter(before + after)
    assert set(counts) == set(range(1003)) and counts.total() - 1003 < 16
    assert moved.epoch == 1 or counts.total() == 1003


def test_a_position_of_another_order_is_refused_with_the_fix(small_shards):
    state = _stream(small_shards).state_dict()
    with pytest.raises(ValueError, match="same shards, train.seed, data.shuffle_buffer"):
        _stream(small_shards, seed=4).load_state_dict(state)


def _serve(directory, tmp_path):
    from infra.daemons import free_port, port_open, spawn, wait_until

    port = free_port()
    server = spawn("http", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                            str(directory)], log=tmp_path / "http.log")
    wait_until(lambda: port_open(port), what="http.server", timeout_s=30, daemons=(server,))
    return server, f"http://127.0.0.1:{port}/{{name}}"


def test_remote_shards_need_only_the_manifest_or_not_even_that(small_shards, tmp_path):
    from infra.daemons import stop

    local = [next(iter(_stream(small_shards)))["image"]]
    manifest_only = tmp_path / "manifest_only"
    manifest_only.mkdir()
    (manifest_only / MANIFEST_NAME).write_bytes((small_shards / MANIFEST_NAME).read_bytes())
    piped = next(iter(_stream(manifest_only, shard_url=f"pipe:cat {small_shards}/{{name}}")))["image"]
    server, url = _serve(small_shards, tmp_path)
    try:
        served = next(iter(_stream(manifest_only, shard_url=url)))["image"]
        nowhere = next(iter(_stream(tmp_path / "no_such_dir", shard_url=url)))["image"]  # manifest from the URL
    finally:
        stop([server])
    assert all(torch.equal(local[0], x) for x in (piped, served, nowhere))


def test_a_run_trains_and_evaluates_from_http_shards_with_no_shard_on_local_disk(small_shards, tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    from infra.daemons import stop

    served = tmp_path / "store"  # the trainer is never told this directory
    served.mkdir()
    for f in small_shards.iterdir():
        (served / f.name).write_bytes(f.read_bytes())
    server, url = _serve(served, tmp_path)
    repo = Path(__file__).resolve().parents[1]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dist_train", "train", str(repo / "configs" / "demo.yaml"),
             f"data.shards={tmp_path / 'nothing_here'}", f"data.shard_url={url}", "train.max_steps=3",
             "train.progress_bar=false", "tracking.enabled=false", f"train.run_dir={tmp_path / 'run'}"],
            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    finally:
        stop([server])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["eval/samples"] == 300


def test_a_missing_remote_shard_is_a_clear_error_within_the_retries(small_shards, tmp_path):
    from infra.daemons import stop

    served = tmp_path / "served"
    served.mkdir()
    (served / MANIFEST_NAME).write_bytes((small_shards / MANIFEST_NAME).read_bytes())  # no shard at all
    server, url = _serve(served, tmp_path)
    try:
        tic = time.monotonic()
        with pytest.raises(ShardReadError, match=r"shard train-00000\d\.tar \(http://.*check data.shard_url"):
            next(iter(_stream(served, shard_url=url, num_workers=0)))
        assert time.monotonic() - tic < 30  # curl does not retry a 404; we retry twice, 1 s and 2 s apart
    finally:
        stop([server])


def test_a_missing_local_shard_or_manifest_says_what_to_run(small_shards, tmp_path):
    with pytest.raises(ShardsNotFound, match="make-shards"):
        load_manifest(str(tmp_path / "nothing"))
    with pytest.raises(ShardsNotFound, match="cannot read the shard manifest"):
        load_manifest(str(tmp_path / "nothing"), f"pipe:cat {tmp_path}/nothing/{{name}}",
                      allow_pipe_from_remote_manifest=True)


def test_a_shard_name_that_would_run_a_shell_command_is_refused_and_never_runs(small_shards, tmp_path):
    import json

    owned = tmp_path / "owned"
    manifest = json.loads((small_shards / MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = f"x.tar; touch {owned}"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / MANIFEST_NAME).write_text(json.dumps(manifest))
    for url in ("", f"pipe:cat {small_shards}/{{name}}"):  # local paths, and a shell command
        with pytest.raises(ValueError, match="not plain file names"):
            _stream(evil, shard_url=url, num_workers=0)
    # Fetched through the pipe: itself, the manifest is refused before it is read, unless the user trusts the store.
    with pytest.raises(ShardsNotFound, match="allow_pipe_from_remote_manifest"):
        load_manifest(str(tmp_path / "no_manifest_here"), f"pipe:cat {evil}/{{name}}")
    with pytest.raises(ValueError, match="not plain file names"):
        load_manifest(str(tmp_path / "no_manifest_here"), f"pipe:cat {evil}/{{name}}",
                      allow_pipe_from_remote_manifest=True)
    assert not owned.exists()


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
