"""Tracking against a team's setup: a real ``mlflow server`` with a PostgreSQL backend store.

The run is logged through the trainer's own tracker (the path training takes, including the
continuation of a run after a requeue) and read back through a fresh ``MlflowClient``.
"""

from __future__ import annotations

import psycopg2
import pytest

from dist_train.config import TrackingConfig
from dist_train.tracking import build_tracker


@pytest.fixture
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url)


def test_run_round_trips_through_server_and_postgres(mlflow_server, postgres_server, client, tmp_path):
    cfg = TrackingConfig(tracking_uri=mlflow_server.url, experiment="team-sweep", run_name="lr0.1")
    config_file = tmp_path / "config.yaml"
    config_file.write_text("optim:\n  lr: 0.1\n")

    tracker = build_tracker(cfg, is_main=True)
    tracker.log_params({"optim.lr": 0.1, "train.global_batch_size": 512})
    for step, loss in enumerate([2.3, 1.7, 1.2]):
        tracker.log_metrics({"train/loss": loss}, step=step)
    tracker.log_artifact(config_file)
    tracker.finish("KILLED")  # as a preempted attempt ends
    # The requeued attempt continues the same run, as the trainer does with its stored run id.
    resumed = build_tracker(cfg, is_main=True, run_id=tracker.run_id)
    resumed.log_metrics({"train/loss": 0.9}, step=3)
    resumed.finish("FINISHED")

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lr0.1"
    assert run.data.params == {"optim.lr": "0.1", "train.global_batch_size": "512"}
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 2.3), (1, 1.7), (2, 1.2), (3, 0.9)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml"]
    downloaded = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "back"))
    assert open(downloaded).read() == config_file.read_text()
    # The server proxied the artifact into its own store, and the run lives in PostgreSQL.
    assert [p.name for p in mlflow_server.artifacts.rglob("config.yaml")] == ["config.yaml"]
    with psycopg2.connect(postgres_server.uri.replace("postgresql+psycopg2", "postgresql")) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT key, value FROM params WHERE run_uuid = %s ORDER BY key", (tracker.run_id,))
            assert cur.fetchall() == [("optim.lr", "0.1"), ("train.global_batch_size", "512")]
    conn.close()
