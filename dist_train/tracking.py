"""Experiment tracking behind one small protocol; MLflow is the implementation.

Only the main rank tracks: ``build_tracker`` hands every other rank a ``NullTracker``,
so no call site needs a rank check.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Protocol

from dist_train.config import TrackingConfig
from dist_train.files import replaced_atomically

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingRefused(RuntimeError):
    """The tracking server refused this run's credentials (or their permissions) when the run started."""


# MLflow 3's UI opens an experiment in its model-training view (not the GenAI one) when this tag says so.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# MLflow's error codes for a missing or wrong login (401) and for a user without the permission (403).
_REFUSED = ("UNAUTHENTICATED", "PERMISSION_DENIED")


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    def last_logged_step(self, key: str = "samples_seen") -> int: ...


class NullTracker:
    """Tracks nothing: non-main ranks, and runs with tracking disabled."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def last_logged_step(self, key: str = "samples_seen") -> int:
        return 0


def warn_without_nvml() -> bool:
    """MLflow's monitor logs GPU utilisation and memory only through nvidia-ml-py (``pynvml``): on a machine with
    a GPU and without it, say what to install. Returns whether it warned."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("pynvml") is not None:
        return False
    log.warning("system metrics: CPU and memory only; for GPU utilisation and memory install nvidia-ml-py "
                "(pip install 'dist_train[gpu]')")
    return True


class NodeSystemMetrics(NullTracker):
    """Tracks nothing but this node's system metrics, into the main rank's run (``system/node<k>/*``): what
    local rank 0 of every other node runs with ``tracking.system_metrics_per_node``."""

    def __init__(self, cfg: TrackingConfig, *, run_id: str, node: int, continued: bool):
        import socket

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(cfg)
        try:
            MlflowClient(tracking_uri=uri).set_tag(run_id, f"dist_train.node{node}", socket.gethostname())
        except Exception as err:  # an unreachable server must not stop a rank; the monitor warns on its own
            log.warning("cannot tag run %s with node %d's host (%s)", run_id, node, str(err).splitlines()[0][:200])
        warn_without_nvml()
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.system_metrics_interval_s,
                                             resume_logging=continued, node_id=f"node{node}", tracking_uri=uri)
        self._monitor.start()

    def finish(self, status: str = "FINISHED") -> None:
        self._monitor.finish()


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def without_credentials(uri: str) -> str:
    """``uri`` with any user name and password taken out of it (``http://u:p@host:5000`` -> ``http://host:5000``):
    what may be logged or written down. A run authenticates through ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``), which stay in its environment."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class MlflowTracker:
    """Logs through ``MlflowClient`` (no global active-run state) and survives an unreachable server.

    Every record goes into a queue that is sent in order. While the server cannot be reached, training
    goes on: the queue is kept, written through to ``pending_file`` so a crash loses nothing, and sent
    again every ``retry_interval_s``. ``dist-train import-tracking PENDING_FILE`` replays a pending file
    whose server never came back. A continued run (``run_id``) keeps its id and params.
    """

    # MLflow's own per-request limits for log_batch.
    _MAX_PARAMS, _MAX_METRICS = 100, 1000

    def __init__(self, cfg: TrackingConfig, *, run_id: str | None = None, pending_file: str | Path | None = None,
                 retry_interval_s: float = 30.0, node: int = 0):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # Fail fast instead of MLflow's default minutes of retries: we queue and retry ourselves.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(cfg)
        self.shown_uri = without_credentials(self.uri)
        """``uri`` as logs and the pending file show it: without credentials."""
        self.cfg = cfg
        self._client = MlflowClient(tracking_uri=self.uri)
        self.run_id = run_id
        self._continued = run_id is not None
        self._continued_at_start = run_id is not None
        self._queue: list[dict[str, Any]] = []
        self._pending_file = Path(pending_file) if pending_file else None
        self._retry_interval_s = retry_interval_s
        self._next_try = 0.0
        self._outage_since: float | None = None
        self._system_metrics: Any = None
        self._finishing = False
        self._node = node
        self._flush(force=True, starting=True)

    # --- the protocol --------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._put({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self._put({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                   "timestamp": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log the file at ``path`` under ``artifact_path`` (a folder of the run's artifacts; None: the top)."""
        self._put({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def finish(self, status: str = "FINISHED") -> None:
        self._finishing = True  # the flush below must not start a monitor again
        if self._system_metrics is not None:
            self._system_metrics.finish()  # its last sample, before the run is marked finished
            self._system_metrics = None
        self._put({"op": "finish", "status": status}, force=True)
        if self._queue:
            log.warning("the MLflow server at %s is still unreachable: %d records are kept in %s; send them "
                        "later with `dist-train import-tracking %s`", self.shown_uri, len(self._queue),
                        self._pending_file, self._pending_file)

    def last_logged_step(self, key: str = "samples_seen") -> int:
        """The last step at which ``key`` was logged in this run (0 if none or unreachable)."""
        if self.run_id is None:
            return 0
        try:
            return max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=0)
        except Exception as err:  # unreachable server: a resumed run may then log a step twice
            log.warning("cannot read the logged steps of run %s (%s)", self.run_id, err)
            return 0

    # --- the queue -----------------------------------------------------------------------------
    def _put(self, record: dict[str, Any], *, force: bool = False) -> None:
        self._queue.append(record)
        self._flush(force=force)
        if self._queue and self._pending_file is not None:
            self._write_pending()

    def _flush(self, *, force: bool = False, starting: bool = False) -> None:
        """Send the queue in order. ``starting``: a server that refuses the credentials raises TrackingRefused
        (a wrong password is not an outage to train through); later, a refusal queues like an outage, so a
        password changed mid-run loses no record."""
        if not force and time.monotonic() < self._next_try:
            return
        try:
            if self.run_id is None:
                self.run_id = self._create_run()
            elif self._continued:
                self._client.update_run(self.run_id, status="RUNNING")
                self._continued = False
            self._start_system_metrics()
            while self._queue:
                self._send(self._queue[0])
                self._queue.pop(0)
        except Exception as err:  # any failure to reach the store: keep training, keep the records
            code = getattr(err, "error_code", None)
            if starting and code in _REFUSED:
                raise TrackingRefused(
                    f"MLflow at {self.shown_uri} refused this run ({code}): set MLFLOW_TRACKING_USERNAME and "
                    f"MLFLOW_TRACKING_PASSWORD to a user of that server who may write to experiment "
                    f"{self.cfg.experiment!r} (docs/launch.md, \"The team's MLflow server\"), or train with "
                    f"tracking.enabled=false") from None
            self._next_try = time.monotonic() + self._retry_interval_s
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("MLflow at %s is unreachable (%s); training goes on, records are queued and "
                            "retried every %.0f s", self.shown_uri, str(err).splitlines()[0][:200],
                            self._retry_interval_s)
            return
        if self._outage_since is not None:
            log.warning("MLflow at %s is reachable again after %.0f s; queued records sent", self.shown_uri,
                        time.monotonic() - self._outage_since)
            self._outage_since = None
            if self._pending_file is not None:
                self._pending_file.unlink(missing_ok=True)

    def _create_run(self) -> str:
        experiment = self._client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            exp_id = self._client.create_experiment(self.cfg.experiment, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        else:
            exp_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before dist_train set it, or by hand
                self._client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return self._client.create_run(exp_id, run_name=self.cfg.run_name or None).info.run_id

    def _start_system_metrics(self) -> None:
        """MLflow's own system-metrics monitor, in its thread, once the run exists (on a continued run it
        continues the steps). It writes to the server itself: during an outage its samples are lost, not
        queued, and it says so in its own warnings."""
        if self._system_metrics is not None or not self.cfg.system_metrics or self.run_id is None or self._finishing:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        warn_without_nvml()
        per_node = self.cfg.system_metrics_per_node  # then the main rank's node is tagged like the others
        if per_node:
            import socket

            self._client.set_tag(self.run_id, f"dist_train.node{self._node}", socket.gethostname())
        self._system_metrics = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                                    resume_logging=self._continued_at_start, tracking_uri=self.uri,
                                                    node_id=f"node{self._node}" if per_node else None)
        self._system_metrics.start()

    def _send(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        op = record["op"]
        assert self.run_id is not None, "records are sent once the run exists"
        if op == "params":
            params = [Param(k, v) for k, v in record["params"].items()]
            for i in range(0, len(params), self._MAX_PARAMS):
                self._client.log_batch(self.run_id, params=params[i:i + self._MAX_PARAMS])
        elif op == "metrics":
            metrics = [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
            for i in range(0, len(metrics), self._MAX_METRICS):
                self._client.log_batch(self.run_id, metrics=metrics[i:i + self._MAX_METRICS])
        elif op == "artifact":
            self._client.log_artifact(self.run_id, record["path"], artifact_path=record.get("artifact_path"))
        elif op == "finish":
            self._client.set_terminated(self.run_id, status=record["status"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")

    def _write_pending(self) -> None:
        # No secret goes to disk: the URI loses any user:password in it, and the environment's credentials
        # (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) are never read here at all.
        header = {"op": "header", "tracking_uri": self.shown_uri, "experiment": self.cfg.experiment,
                  "run_name": self.cfg.run_name, "run_id": self.run_id,
                  "credentials_removed": self.shown_uri != self.uri}
        assert self._pending_file is not None
        self._pending_file.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(self._pending_file) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in [header, *self._queue]))


def import_pending(pending_file: str | Path, *, tracking_uri: str | None = None) -> str:
    """Send the records of a pending file (see ``MlflowTracker``); returns the run id they went to.

    The file is JSON, never unpickled. Its artifacts must lie in the run directory that holds it (where the
    trainer writes them): a pending file is data, and one that names another file (``~/.ssh/id_rsa``) is
    refused before anything is sent, so it cannot upload that file to the server."""
    pending_file = Path(pending_file)
    lines = [json.loads(line) for line in pending_file.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("op") != "header":
        raise ValueError(f"{pending_file} is not a dist_train pending-tracking file (no header line)")
    header, records = lines[0], lines[1:]
    run_dir = pending_file.resolve().parent
    for record in records:
        if record.get("op") == "artifact" and not Path(record["path"]).resolve().is_relative_to(run_dir):
            raise ValueError(f"{pending_file} asks to upload {record['path']}, outside its run directory {run_dir}; "
                             f"dist_train writes only artifacts of the run's own directory, so this file was "
                             f"changed: nothing was sent")
    if header.get("credentials_removed") and not tracking_uri:
        log.warning("the tracking URI of %s had credentials in it, which were not written down: give them in "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or pass --tracking-uri", pending_file)
    cfg = TrackingConfig(tracking_uri=tracking_uri or header["tracking_uri"], experiment=header["experiment"],
                         run_name=header["run_name"], system_metrics=False)  # this machine's use is not the run's
    tracker = MlflowTracker(cfg, run_id=header["run_id"], retry_interval_s=0.0)
    tracker._queue = records
    tracker._flush(force=True)
    if tracker._queue:
        raise ConnectionError(f"MLflow at {tracker.shown_uri} is still unreachable (or refuses these credentials); "
                              f"{len(tracker._queue)} records not sent")
    Path(pending_file).unlink()
    assert tracker.run_id is not None  # the flush above created or continued the run
    return tracker.run_id


def build_tracker(cfg: TrackingConfig, *, is_main: bool, run_id: str | None = None,
                  pending_file: str | Path | None = None, node: int = 0) -> Tracker:
    if not (is_main and cfg.enabled):
        return NullTracker()
    return MlflowTracker(cfg, run_id=run_id, pending_file=pending_file, node=node)
