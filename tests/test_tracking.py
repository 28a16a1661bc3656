"""What the MLflow UI shows of a run: the experiment filed as model training, and the run's system metrics.

Against a real sqlite store, read back through ``MlflowClient``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import torch
from multiproc import run_ranks

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


def test_finishing_stops_the_monitor_for_good(tmp_path):
    import threading

    tracker = MlflowTracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="once",
                                           system_metrics_interval_s=0.2))
    tracker.finish()
    time.sleep(0.5)
    # The finish record's own flush once started a second monitor that nobody stopped.
    assert tracker._system_metrics is None
    assert not [t for t in threading.enumerate() if "SystemMetricsMonitor" in t.name and t.is_alive()]


def test_system_metrics_can_be_turned_off(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(TrackingConfig(tracking_uri=uri, experiment="quiet", system_metrics=False,
                                           system_metrics_interval_s=0.2))
    time.sleep(0.6)
    tracker.finish()
    assert not [k for k in MlflowClient(uri).get_run(tracker.run_id).data.metrics if k.startswith("system/")]


def _two_nodes(rank, world_size, uri, run_dir):
    from dist_train.config import load_config
    from dist_train.distributed import DistInfo
    from dist_train.train import _start_tracking_on_every_rank

    # Each rank plays local rank 0 of a node of its own, as on two nodes with one rank each.
    info = DistInfo(rank=rank, world_size=world_size, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    cfg = load_config(None, [f"tracking.tracking_uri={uri}", "tracking.experiment=nodes",
                             "tracking.system_metrics_per_node=true", "tracking.system_metrics_interval_s=0.2"])
    tracker = _start_tracking_on_every_rank(cfg, info, Path(run_dir), None, precision="fp32")
    torch.distributed.barrier()  # as training would keep the ranks together; a node monitor stops with the run
    time.sleep(1.5)
    if rank == 1:
        tracker.finish()
    torch.distributed.barrier()
    if rank == 0:
        tracker.finish()
    return tracker.run_id


def test_every_node_logs_its_own_system_metrics_into_the_run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id, none = run_ranks(_two_nodes, uri, str(tmp_path / "run"), world_size=2)
    assert none is None  # the other node tracks nothing else
    run = MlflowClient(uri).get_run(run_id)
    for node in (0, 1):
        assert f"system/node{node}/cpu_utilization_percentage" in run.data.metrics
        assert run.data.tags[f"dist_train.node{node}"] == socket.gethostname()
    assert "system/cpu_utilization_percentage" not in run.data.metrics  # every sample says which node


def test_a_gpu_machine_without_nvidia_ml_py_is_told_what_to_install(monkeypatch, caplog):
    import importlib.util

    from dist_train import tracking

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pynvml" else real_find_spec(name, *a))
    with caplog.at_level("WARNING", logger="dist_train.tracking"):
        assert tracking.warn_without_nvml()
    assert "nvidia-ml-py" in caplog.text and "dist_train[gpu]" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not tracking.warn_without_nvml()  # a CPU machine has nothing to install
