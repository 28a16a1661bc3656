"""Experiment tracking behind one small protocol; MLflow is the implementation.

Only the main rank tracks: ``build_tracker`` hands every other rank a ``NullTracker``,
so no call site needs a rank check.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

from dist_train.config import TrackingConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def log_artifact(self, path: str | Path) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing: non-main ranks, and runs with tracking disabled."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class MlflowTracker:
    """Logs through ``MlflowClient`` (no global active-run state). Continues ``run_id`` when given."""

    # MLflow's own per-request limits for log_batch.
    _MAX_PARAMS, _MAX_METRICS = 100, 1000

    def __init__(self, cfg: TrackingConfig, *, run_id: str | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(cfg)
        self._client = MlflowClient(tracking_uri=self.uri)
        if run_id:
            self.run_id = self._client.get_run(run_id).info.run_id
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name(cfg.experiment)
            exp_id = experiment.experiment_id if experiment else self._client.create_experiment(cfg.experiment)
            self.run_id = self._client.create_run(exp_id, run_name=cfg.run_name or None).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), self._MAX_PARAMS):
            self._client.log_batch(self.run_id, params=items[i:i + self._MAX_PARAMS])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), self._MAX_METRICS):
            self._client.log_batch(self.run_id, metrics=items[i:i + self._MAX_METRICS])

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def build_tracker(cfg: TrackingConfig, *, is_main: bool, run_id: str | None = None) -> Tracker:
    if not (is_main and cfg.enabled):
        return NullTracker()
    return MlflowTracker(cfg, run_id=run_id)
