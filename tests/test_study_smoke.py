"""The Fashion-MNIST seed study (benchmarks/study_fashion_mnist.py): its batches, and a smoke run of every setting.

The smoke run trains each of the 10 settings for 2 steps of a tiny model on the small shards, tracked
in a temporary MLflow store, then writes the report: every code path of the study, in seconds.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_fashion_mnist", REPO / "benchmarks" / "study_fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_settings_cover_three_schedules_by_three_optimizers_and_adaptive(study):
    names = [s.name for s in study.settings()]
    assert len(names) == len(set(names)) == 10
    for schedule in ("decay_lr", "hybrid", "increase_batch"):
        for optimizer in ("sgd", "radam", "radam_lookahead"):
            assert f"{schedule}-{optimizer}" in names
    assert "adaptive-sgd" in names


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_batch_of_every_schedule_divides_into_micro_batches(study, world_size):
    # Smith et al.'s ladder with factor 5 at three milestones, on the full 60,000 images.
    expected = {"decay_lr": [128] * 4, "hybrid": [128, 640, 640, 640], "increase_batch": [128, 640, 3200, 16000],
                "adaptive": [128, 640, 3200, 16000]}
    for setting in study.settings():
        batches = study.planned_batches(setting, world_size=world_size)
        assert batches == expected[setting.name.split("-")[0]], setting.name


def test_smoke_runs_every_setting_and_writes_the_report(study, small_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    started = time.monotonic()
    rc = study.main(["--smoke", "--shards", str(small_shards), "--tracking-uri", uri, "--run-root",
                     str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    elapsed = time.monotonic() - started
    assert rc == 0
    assert elapsed < 90, f"the smoke study took {elapsed:.0f} s"

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("study_fashion_mnist_smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 10 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["train.seed"] for r in runs} == {"0"}
    assert {int(r.data.metrics["final/step"]) for r in runs} == {2}
    modes = {r.info.run_name: r.data.params["schedule.mode"] for r in runs}
    assert modes["adaptive-sgd-seed0"] == "adaptive" and modes["hybrid-radam_lookahead-seed0"] == "hybrid"

    table = (tmp_path / "report" / "results.md").read_text()
    assert table.count("| 1 | ") == 10  # one row per setting, one seed each
    for png in ("acc_vs_epochs.png", "acc_vs_updates.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Finished runs are skipped: a second call trains nothing and rewrites the report.
    assert study.main(["--smoke", "--shards", str(small_shards), "--tracking-uri", uri, "--run-root",
                       str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--only", "adaptive"]) == 0
    assert len(client.search_runs([experiment.experiment_id])) == 10
