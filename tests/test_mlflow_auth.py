"""The team server with a login: MLflow's basic-auth app as docker/docker-compose.mlflow.yml runs it.

A real ``mlflow server --app-name basic-auth`` with the repository's docker/mlflow-auth.ini. A real training
run logs into it with a user's credentials from the environment; requests without credentials or with wrong
ones get 401 and change nothing; a run's outage queue on disk holds no secret.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from infra.daemons import free_port

from dist_train.config import ConfigError, TrackingConfig, load_config
from dist_train.tracking import MlflowTracker, TrackingRefused, import_pending

REPO = Path(__file__).resolve().parents[1]
ALICE = ("alice", "alice-" + secrets.token_hex(12))
BOB = ("bob", "bob-" + secrets.token_hex(12))


@pytest.fixture(scope="module")
def server(mlflow_auth_server):
    mlflow_auth_server.add_user(*ALICE)
    mlflow_auth_server.add_user(*BOB)
    return mlflow_auth_server


def _as(monkeypatch, user: tuple[str, str] | None) -> None:
    """This process's MLflow client logs in as ``user`` (None: anonymously), as a run's environment says."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    if user is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.url)


def _belongs_to_alice(server, run_id: str) -> bool:
    """The server gave the run's experiment to the user who created it: bob, who may read, may not write."""
    tag = {"run_id": run_id, "key": "probe", "value": "1"}
    return (server.request("POST", "/api/2.0/mlflow/runs/set-tag", tag, auth=BOB)[0] == 403
            and server.request("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}", auth=BOB)[0] == 200)


def _files_hold(directory: Path, secret: str) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_run_with_credentials_logs_its_params_metrics_and_model(server, small_shards, tmp_path, monkeypatch):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_USERNAME": ALICE[0],
           "MLFLOW_TRACKING_PASSWORD": ALICE[1]}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train.cli", "train", str(REPO / "configs/demo.yaml"), f"data.shards={small_shards}",
         "train.max_steps=2", "train.log_every_steps=1", "train.progress_bar=false", f"tracking.tracking_uri={server.url}",
         "tracking.experiment=team-auth", f"train.run_dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    _as(monkeypatch, server.admin)
    client = _client(server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _belongs_to_alice(server, run_id)
    assert run.data.params["optim.name"] == "radam" and run.data.params["tracking.experiment"] == "team-auth"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
    downloaded = torch.load(client.download_artifacts(run_id, "model/model.pt", str(tmp_path / "back")),
                            weights_only=True)
    exported = torch.load(run_dir / "model" / "model.pt", weights_only=True)
    assert downloaded.keys() == exported.keys() and all(torch.equal(downloaded[k], exported[k]) for k in exported)
    assert not (run_dir / "mlflow-pending.jsonl").exists()
    assert _files_hold(run_dir, ALICE[1]) == []  # the password is in no file the run wrote


def _run_of_alice(server, monkeypatch) -> tuple[str, str]:
    _as(monkeypatch, ALICE)
    client = _client(server)
    experiment = client.create_experiment(f"alice-{secrets.token_hex(4)}")
    run_id = client.create_run(experiment).info.run_id
    client.log_param(run_id, "optim.lr", "0.1")
    return experiment, run_id


@pytest.mark.parametrize("who", ["nobody", "wrong password", "unknown user"])
def test_a_client_without_valid_credentials_gets_401_and_changes_nothing(server, monkeypatch, who):
    experiment, run_id = _run_of_alice(server, monkeypatch)
    auth = {"nobody": None, "wrong password": (ALICE[0], ALICE[1] + "x"), "unknown user": ("mallory", ALICE[1])}[who]
    attempts = [
        ("POST", "/api/2.0/mlflow/experiments/create", {"name": f"intruder-{experiment}"}),
        ("POST", "/api/2.0/mlflow/runs/log-parameter", {"run_id": run_id, "key": "evil", "value": "1"}),
        ("POST", "/api/2.0/mlflow/runs/log-metric", {"run_id": run_id, "key": "loss", "value": 0.0,
                                                     "timestamp": 0, "step": 0}),
        ("POST", "/api/2.0/mlflow/runs/delete", {"run_id": run_id}),
        ("POST", "/api/2.0/mlflow/experiments/delete", {"experiment_id": experiment}),
        ("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}", None),
        ("POST", "/api/2.0/mlflow/users/create", {"username": "mallory2", "password": "x" * 16}),
    ]
    for method, path, body in attempts:
        status, _ = server.request(method, path, body, auth=auth)
        assert status == 401, (who, path, status)
    # An artifact upload through the server's proxy is refused as well.
    upload = urllib.request.Request(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{experiment}/{run_id}/"
                                    f"artifacts/evil.txt", data=b"owned", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(upload, timeout=30)
    assert refused.value.code == 401
    # Nothing changed, as the owner sees it.
    _as(monkeypatch, ALICE)
    client = _client(server)
    run = client.get_run(run_id)
    assert run.info.lifecycle_stage == "active" and run.data.params == {"optim.lr": "0.1"} and not run.data.metrics
    assert client.get_experiment(experiment).lifecycle_stage == "active"
    assert client.get_experiment_by_name(f"intruder-{experiment}") is None
    assert client.list_artifacts(run_id) == []
    assert not list(server.artifacts.rglob("evil.txt"))


def test_another_user_reads_a_run_but_cannot_change_it(server, monkeypatch):
    _, run_id = _run_of_alice(server, monkeypatch)
    assert server.request("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}", auth=BOB)[0] == 200  # READ
    status, _ = server.request("POST", "/api/2.0/mlflow/runs/log-parameter",
                               {"run_id": run_id, "key": "evil", "value": "1"}, auth=BOB)
    assert status == 403
    _as(monkeypatch, ALICE)
    assert _client(server).get_run(run_id).data.params == {"optim.lr": "0.1"}


def test_a_tracker_with_wrong_credentials_stops_with_what_to_do(server, monkeypatch):
    _as(monkeypatch, (ALICE[0], "not-the-password"))
    with pytest.raises(TrackingRefused, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        MlflowTracker(TrackingConfig(tracking_uri=server.url, experiment="wrong-login"))


def test_the_outage_queue_holds_no_secret_and_imports_with_the_credentials(server, tmp_path, monkeypatch):
    dead = free_port()
    pending = tmp_path / "run" / "mlflow-pending.jsonl"
    (tmp_path / "run").mkdir()
    config_file = tmp_path / "run" / "config.yaml"
    config_file.write_text("optim:\n  lr: 0.1\n")
    _as(monkeypatch, ALICE)
    # The URI may carry the login too (MLflow's client accepts it); it must not reach the disk either.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{ALICE[0]}:{ALICE[1]}@127.0.0.1:{dead}")
    tracker = MlflowTracker(TrackingConfig(experiment="offline-auth"), pending_file=pending, retry_interval_s=0.0)
    tracker.log_params({"optim.lr": 0.1})
    tracker.log_metrics({"train/loss": 1.5}, step=1)
    tracker.log_artifact(config_file)
    tracker.finish()
    text = pending.read_text()
    assert ALICE[1] not in text and f"{ALICE[0]}:" not in text
    header = json.loads(text.splitlines()[0])
    assert header["tracking_uri"] == f"http://127.0.0.1:{dead}" and header["credentials_removed"] is True
    # Later, from the login node: the credentials come from the environment again.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    run_id = import_pending(pending, tracking_uri=server.url)
    run = _client(server).get_run(run_id)
    assert run.data.params == {"optim.lr": "0.1"} and run.data.metrics == {"train/loss": 1.5}
    assert _belongs_to_alice(server, run_id) and not pending.exists()


def test_a_password_in_the_configured_uri_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        load_config(None, ["tracking.tracking_uri=http://alice:secret@mlflow.example:5000"])


def test_import_refuses_a_pending_file_that_names_a_file_outside_its_run(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (tmp_path / "run").mkdir()
    pending = tmp_path / "run" / "mlflow-pending.jsonl"
    records = [{"op": "header", "tracking_uri": f"http://127.0.0.1:{free_port()}", "experiment": "x",
                "run_name": "", "run_id": None},
               {"op": "artifact", "path": str(tmp_path / "run" / ".." / "secret.txt"), "artifact_path": None}]
    pending.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="outside its run directory.*nothing was sent"):
        import_pending(pending)
    assert pending.exists()
