"""A real `torchrun` of 2 gloo ranks through the CLI, then the MLflow store read back independently."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from dist_train.launch.local import torchrun_command

REPO = Path(__file__).resolve().parents[1]


def torchrun(args, *, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = torchrun_command(None, args, nproc_per_node=2)  # the launcher's own command line
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def short_run(small_shards, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("e2e")
    proc = torchrun([str(REPO / "configs" / "demo.yaml"), f"data.shards={small_shards}", "train.max_steps=6",
                     "train.log_every_steps=2", "train.progress_bar=false", "tracking.experiment=e2e",
                     "tracking.run_name=short", f"tracking.tracking_uri=sqlite:///{cwd}/mlflow.db",
                     "checkpoint.every_steps=3"], cwd=cwd)
    return cwd, proc


def test_torchrun_two_ranks_through_the_cli_exits_0(short_run):
    cwd, proc = short_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((cwd / "runs/demo/summary.json").read_text())
    assert summary["step"] == 6 and summary["samples_seen"] == 6 * 128
    assert proc.stdout.count("final test accuracy") == 1  # printed by rank 0 only
    assert sorted(p.name for p in (cwd / "runs/demo/checkpoints").iterdir()) == ["step-00000003",
                                                                               "step-00000006"]


def test_mlflow_store_holds_the_run_params_metrics_and_config(short_run):
    cwd, proc = short_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db")
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "short" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.name"] == "radam" and params["optim.lookahead.k"] == "5"
    assert params["train.global_batch_size"] == "128" and params["world_size"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4, 6]
    seen = client.get_metric_history(run.info.run_id, "samples_seen")
    assert [m.value for m in seen] == [256, 512, 768]
    for key in ("lr", "global_batch_size", "momentum", "throughput/samples_per_s", "eval/acc1"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(cwd / "dl"))
    assert "lookahead" in Path(local).read_text()


def test_mlflow_run_holds_the_evaluated_model_and_the_checkpoint_steps(short_run, small_shards):
    import torch
    from mlflow.tracking import MlflowClient

    from dist_train.config import load_config
    from dist_train.data import loader
    from dist_train.data.shards import read_manifest
    from dist_train.models import build_model
    from dist_train.trainer import Normalise

    cwd, proc = short_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    run_id = run.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/checkpoint_step")] == [3, 6]
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]
    model_state = torch.load(client.download_artifacts(run_id, "model/model.pt", str(cwd / "dl")), weights_only=True)

    # The demo uses Lookahead (k=5): after 6 steps the slow weights differ from the trained ones, and the
    # artifact holds the slow ones, the model that the logged test accuracy measured.
    final = cwd / "runs/demo/checkpoints/step-00000006"
    fast = torch.load(final / "backend.pt", weights_only=True)["model"]
    assert model_state.keys() == fast.keys()
    assert any(not torch.equal(model_state[k], fast[k].float()) for k in fast if fast[k].is_floating_point())
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [f"data.shards={small_shards}"])
    manifest = read_manifest(small_shards)
    model = build_model(cfg.model.name, num_classes=len(manifest["classes"]),
                        in_channels=manifest["image"]["channels"], width=cfg.model.width)
    model.load_state_dict(model_state)
    model.eval()
    normalise = Normalise(*loader.NORMALISATION[manifest["dataset"]], device=torch.device("cpu"), channels_last=False)
    hits = seen = 0
    with torch.no_grad():
        for batch in loader.eval_batches(manifest, cfg.data, micro_batch_size=64, rank=0, world_size=1):
            hits += int((model(normalise(batch["image"])).argmax(dim=1) == batch["label"]).sum())
            seen += batch["label"].numel()
    summary = json.loads((cwd / "runs/demo/summary.json").read_text())
    assert seen == summary["eval/samples"]
    assert abs(hits - summary["eval/acc1"] * seen) <= 1  # one borderline image may flip with the batch layout
