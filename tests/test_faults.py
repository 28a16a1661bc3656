"""Real faults on real processes: preemption signals, a killed rank, NaN losses, fuzzed configs.

Each interrupted run is compared with an uninterrupted one: the MLflow loss history must be the
same, step for step and bit for bit, with no step logged twice.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness import global_batches, make_trainer
from multiproc import run_ranks
from torch import nn

from dist_train.faults import PREEMPTED_EXIT_CODE, NonFiniteLoss
from dist_train.optim.config import OptimConfig

REPO = Path(__file__).resolve().parents[1]
STEPS = 24


def _cmd(shards, run_dir, uri, *, nproc, max_restarts=0):
    train = ["train", str(REPO / "configs/demo.yaml"), f"data.shards={shards}", f"train.max_steps={STEPS}", "train.epochs=100",
             "train.log_every_steps=1", "train.progress_bar=false", "checkpoint.every_steps=4",
             "schedule.milestones_epochs=[0.05]", "schedule.noise_scale.enabled=true",
             f"train.run_dir={run_dir}", f"tracking.tracking_uri={uri}", "tracking.experiment=faults"]
    if nproc == 1:
        return [sys.executable, "-m", "dist_train.cli", *train]
    if max_restarts:
        train.append("train.dist_timeout_s=60")  # a hung attempt fails and is restarted
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "dist_train.cli", *train]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _losses(uri, run_dir):
    from mlflow.tracking import MlflowClient

    run_id = (Path(run_dir) / "mlflow_run_id").read_text().strip()
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    return sorted((m.step, m.value) for m in history)


def _wait_for_checkpoint(run_dir, proc, step):
    target = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    deadline = time.monotonic() + 240
    while not target.is_dir():
        assert proc.poll() is None, "the run ended before the checkpoint to interrupt at"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


def _rank_pids(parent_pid):
    """{rank: pid} of torchrun's worker processes."""
    out = {}
    for pid in Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if ranks:
            out[int(ranks[0])] = int(pid)
    return out


@pytest.fixture(scope="module")
def reference(small_shards, tmp_path_factory):
    """The uninterrupted 2-rank and 1-rank runs' loss histories."""
    root = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{root}/mlflow.db"
    out = {}
    for nproc in (1, 2):
        run_dir = root / f"np{nproc}"
        proc = subprocess.run(_cmd(small_shards, run_dir, uri, nproc=nproc), cwd=root, env=_env(),
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[nproc] = _losses(uri, run_dir)
        assert [s for s, _ in out[nproc]] == list(range(1, STEPS + 1))
    return out


def test_sigterm_checkpoints_exits_75_and_the_rerun_continues_exactly(small_shards, tmp_path, reference):
    uri, run_dir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    proc = subprocess.Popen(_cmd(small_shards, run_dir, uri, nproc=1), cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run_dir, proc, 8)
    tic = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "preemption signal" in err
    stopped_at = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert 8 <= stopped_at < STEPS  # the checkpoint written on the signal, at the step it stopped
    rerun = subprocess.run(_cmd(small_shards, run_dir, uri, nproc=1), cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    print(f"stopped at step {stopped_at}; signal-to-exit {time.monotonic() - tic:.1f} s")
    assert _losses(uri, run_dir) == reference[1]  # same values, every step exactly once


def test_sigusr1_on_one_rank_stops_both_ranks_together_and_resume_is_exact(small_shards, tmp_path, reference):
    uri, run_dir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    proc = subprocess.Popen(_cmd(small_shards, run_dir, uri, nproc=2), cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run_dir, proc, 4)
    os.kill(_rank_pids(proc.pid)[1], signal.SIGUSR1)  # only rank 1 hears it
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and f"exitcode  : {PREEMPTED_EXIT_CODE}" in err, err[-3000:]
    rerun = subprocess.run(_cmd(small_shards, run_dir, uri, nproc=2), cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _losses(uri, run_dir) == reference[2]


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_completes_exactly(small_shards, tmp_path, reference):
    uri, run_dir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    # More than one restart allowed, as a user would: the first restart after a kill often fails in gloo's
    # connection set-up (stale peer addresses, refused); the next one goes through (docs/faults.md).
    proc = subprocess.Popen(_cmd(small_shards, run_dir, uri, nproc=2, max_restarts=3), cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run_dir, proc, 8)
    tic = time.monotonic()
    os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err
    restarts = err.count("Restarting worker group")
    print(f"recovery and the rest of the run: {time.monotonic() - tic:.1f} s, {restarts} restart(s)")
    assert _losses(uri, run_dir) == reference[2]


def _minutes_checkpoints(rank, world_size, run_dir):
    import time as clock

    trainer = make_trainer(rank, world_size, batches=global_batches(6, 16), micro=8, run_dir=run_dir,
                           optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.0))
    # Only rank 0's clock counts: here it says "due" at every step, rank 1's never would. If each rank
    # decided for itself, rank 0 would enter the collective save alone and the test would time out.
    trainer.checkpoint_every_minutes = 1e-6 if rank == 0 else 1e6
    saves = []
    save = trainer.checkpointer.save
    trainer.checkpointer.save = lambda **kw: saves.append(kw["step"]) or save(**kw)
    trainer._last_checkpoint_time = clock.monotonic() - 1  # due from the first step
    trainer.fit()
    return saves


def test_time_based_checkpoints_follow_rank_0s_clock_on_every_rank(tmp_path):
    saves = run_ranks(_minutes_checkpoints, str(tmp_path), world_size=2, timeout_s=240)
    assert saves[0] == saves[1] == [1, 2, 3, 4, 5, 6]  # steps 1-5 on time, 6 at the end of the run


class _NaNAtCall(nn.Module):
    """The harness's tiny net, whose output is NaN on one forward call."""

    def __init__(self, nan_call):
        super().__init__()
        from harness import tiny_net

        self.net, self.calls, self.nan_call = tiny_net(), 0, nan_call

    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.calls == self.nan_call else out


class _NaNGradient(torch.autograd.Function):
    """Identity forward; its backward turns the gradient into NaN: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _NaNGradAtCall(_NaNAtCall):
    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        return _NaNGradient.apply(out) if self.calls == self.nan_call else out


def _nan_run(rank, world_size, policy, model=_NaNAtCall, backend="ddp"):
    from dist_train.config import TrainConfig

    sgd = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.0)
    # Only rank 1 sees the NaN (its 2nd forward: step 2, one micro-step per step): both ranks must skip or stop together.
    trainer = make_trainer(rank, world_size, batches=global_batches(4, 16), micro=8, optim=sgd, backend=backend,
                           model_fn=lambda: model(2 if rank == 1 else -1))
    trainer.cfg = TrainConfig(**{**trainer.cfg.__dict__, "nonfinite_loss": policy})
    before = [p.detach().clone() for p in trainer.backend.module.parameters()]
    try:
        trainer.train_step(trainer.schedule.state_at(trainer.progress.samples_seen))
        after_first = [p.detach().clone() for p in trainer.backend.module.parameters()]
        trainer.train_step(trainer.schedule.state_at(trainer.progress.samples_seen))
    except NonFiniteLoss as err:
        return "stopped", str(err)
    after_second = list(trainer.backend.module.parameters())
    unchanged = all(torch.equal(a, b) for a, b in zip(after_first, after_second))
    finite = all(torch.isfinite(p).all() for p in after_second)
    moved = not all(torch.equal(a, b) for a, b in zip(before, after_first))
    return trainer.progress.skipped_steps, unchanged and finite and moved


def test_nan_loss_on_one_rank_is_skipped_by_both_ranks():
    outs = run_ranks(_nan_run, "skip", world_size=2)
    assert outs == [(1, True), (1, True)]


def test_nan_loss_stops_with_a_clear_message_on_both_ranks():
    outs = run_ranks(_nan_run, "stop", world_size=2)
    for status, message in outs:
        assert status == "stopped" and "NaN or Inf at step 2" in message and "train.nonfinite_loss=skip" in message


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_nan_gradients_under_a_finite_loss_on_one_rank_are_skipped_by_both_ranks(backend):
    # The loss is finite on both ranks; only rank 1's backward yields NaN. After the all-reduce every rank's
    # gradient is NaN, and stepping it would put NaN into every weight.
    outs = run_ranks(_nan_run, "skip", _NaNGradAtCall, backend, world_size=2, timeout_s=300)
    assert outs == [(1, True), (1, True)]
    stopped = run_ranks(_nan_run, "stop", _NaNGradAtCall, "ddp", world_size=2)
    assert all(status == "stopped" and "gradient norm was NaN or Inf at step 2" in message
               for status, message in stopped)
