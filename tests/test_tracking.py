"""What the MLflow UI shows of a run: the experiment filed as model training, and the run's system metrics.

Against a real sqlite store, read back through ``MlflowClient``.
"""

from __future__ import annotations

import time

from dist_train.config import TrackingConfig
from dist_train.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, MlflowTracker


def test_a_run_is_filed_as_model_training_and_logs_system_metrics(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_experiment("made-by-hand")  # an experiment dist_train did not create gets the tag too
    trackers = [MlflowTracker(TrackingConfig(tracking_uri=uri, experiment=name, system_metrics_interval_s=0.2))
                for name in ("fresh", "made-by-hand")]
    for tracker in trackers:
        tracker.log_metrics({"train/loss": 1.0}, step=1)
    time.sleep(1.5)
    for tracker in trackers:
        tracker.finish()
    for name, tracker in zip(("fresh", "made-by-hand"), trackers):
        assert client.get_experiment_by_name(name).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
        history = client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")
        assert len(history) >= 2 and all(0 <= m.value <= 100 * 64 for m in history)
        metrics = client.get_run(tracker.run_id).data.metrics
        assert "system/system_memory_usage_megabytes" in metrics and metrics["train/loss"] == 1.0


def test_system_metrics_can_be_turned_off(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(TrackingConfig(tracking_uri=uri, experiment="quiet", system_metrics=False,
                                           system_metrics_interval_s=0.2))
    time.sleep(0.6)
    tracker.finish()
    assert not [k for k in MlflowClient(uri).get_run(tracker.run_id).data.metrics if k.startswith("system/")]
