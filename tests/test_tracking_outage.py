"""An unreachable MLflow server loses nothing: records queue, survive on disk, and arrive once it is back.

Against a real ``mlflow server`` (sqlite backend) that the test stops and restarts on the same port.
"""

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from infra.daemons import free_port, spawn, stop, wait_until

from dist_train.config import TrackingConfig
from dist_train.tracking import MlflowTracker, import_pending

REPO = Path(__file__).resolve().parents[1]


def _healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(root: Path, port: int):
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    daemon = spawn("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                              "--backend-store-uri", f"sqlite:///{root}/store.db", "--artifacts-destination",
                              str(root / "artifacts"), "--workers", "1"], log=root / "server.log", env=env, cwd=root)
    try:
        wait_until(lambda: _healthy(port), what="mlflow server", timeout_s=120, daemons=(daemon,), interval_s=0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop([daemon], timeout_s=15)


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key),
                                              key=lambda m: m.step)]


def test_server_down_mid_run_then_back_loses_nothing_and_duplicates_nothing(tmp_path):
    port = free_port()
    pending = tmp_path / "run" / "mlflow-pending.jsonl"
    with mlflow_server(tmp_path, port) as uri:
        tracker = MlflowTracker(TrackingConfig(tracking_uri=uri, experiment="outage"), pending_file=pending,
                                retry_interval_s=0.0)
        tracker.log_params({"optim.lr": 0.1})
        tracker.log_metrics({"loss": 1.0}, step=1)
    # The server is gone: training goes on, records queue up and are on disk.
    for step in (2, 3, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    records = [json.loads(line) for line in pending.read_text().splitlines()]
    assert [r.get("step") for r in records if r["op"] == "metrics"] == [2, 3, 4]
    with mlflow_server(tmp_path, port) as uri:  # back, on the same store
        tracker.log_metrics({"loss": 0.2}, step=5)
        tracker.finish()
        assert not pending.exists()
        assert _history(uri, tracker.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25), (5, 0.2)]


def test_server_down_for_the_whole_run_keeps_a_file_that_imports_later(small_shards, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train.cli", "train", str(REPO / "configs/demo.yaml"), f"data.shards={small_shards}",
         "train.max_steps=3", "train.log_every_steps=1", "train.progress_bar=false", f"tracking.tracking_uri={uri}",
         "tracking.experiment=offline", f"train.run_dir={tmp_path}/run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # training is not stopped by the tracking outage
    assert "is unreachable" in proc.stderr and "dist-train import-tracking" in proc.stderr
    pending = tmp_path / "run" / "mlflow-pending.jsonl"
    assert pending.is_file()
    with mlflow_server(tmp_path, port):
        run_id = import_pending(pending)
        assert [s for s, _ in _history(uri, run_id, "train/loss")] == [1, 2, 3]
        from mlflow.tracking import MlflowClient

        run = MlflowClient(uri).get_run(run_id)
        assert run.data.params["optim.name"] == "radam" and run.info.status == "FINISHED"
    assert not pending.exists()


def test_import_of_a_file_that_is_not_ours_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"op": "metrics"}\n')
    with pytest.raises(ValueError, match="not a dist_train pending-tracking file"):
        import_pending(bad)
