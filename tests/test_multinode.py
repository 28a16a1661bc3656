"""Two real hosts (network namespaces joined by a veth pair, tests/infra/netns.py) train over gloo like two
ranks on one host: ``dist-train launch local --nnodes 2 --rdzv-endpoint HOST0:PORT`` run on each host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from infra.daemons import free_port
from infra.netns import two_hosts

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as made:
        yield made


def _train_args(shards, run_dir, uri, backend):
    return [str(REPO / "configs/demo.yaml"), f"data.shards={shards}", f"train.max_steps={STEPS}", "train.epochs=100",
            "train.log_every_steps=1", "train.progress_bar=false", f"train.run_dir={run_dir}",
            f"tracking.tracking_uri={uri}", "tracking.experiment=multinode", f"backend.name={backend}",
            "train.dist_timeout_s=120",
            # One thread per rank in both layouts: by default the cores are divided among a host's local ranks,
            # and another thread count changes the order of sums inside the convolutions.
            "train.threads_per_rank=1"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu"}


def _losses(uri, run_dir):
    from mlflow.tracking import MlflowClient

    run_id = (Path(run_dir) / "mlflow_run_id").read_text().strip()
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "train/loss"))


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_two_hosts_train_to_the_losses_of_two_ranks_on_one_host(hosts, small_shards, tmp_path, backend):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    one_host = subprocess.run(
        [sys.executable, "-m", "dist_train", "launch", "local", "--nproc", "2",
         *_train_args(small_shards, tmp_path / "one_host", uri, backend)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert one_host.returncode == 0, one_host.stderr[-3000:]
    endpoint = f"{hosts.hostnames[0]}:{free_port()}"  # host 0: the rendezvous store runs there
    launch = [sys.executable, "-m", "dist_train", "launch", "local", "--nproc", "1", "--nnodes", "2",
              "--rdzv-endpoint", endpoint, "--rdzv-id", f"two-hosts-{backend}",
              *_train_args(small_shards, tmp_path / "two_hosts", uri, backend)]
    procs = [subprocess.Popen(hosts.command(i, launch), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):  # each namespace reaches the other only through the veth pair
        assert p.returncode == 0, out[-3000:]
    reference, got = _losses(uri, tmp_path / "one_host"), _losses(uri, tmp_path / "two_hosts")
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    # Same world size, ranks, data and threads: the same sums in the same order, whichever host a rank is on.
    assert got == reference
