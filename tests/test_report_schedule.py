"""The schedule figure of `dist-train report`, from two real short training runs with different schedules.

Run A grows the batch at epoch 1 (increase_batch) and measures the noise scale; run B decays the lr and
does not measure it. The figure's data is held against the logged histories: the plotted B is the logged
``global_batch_size``, and B_simple appears only for the run, and at the steps, where it was measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.report import make_report

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name: overrides on configs/demo.yaml
    "grow": ["schedule.mode=increase_batch", "schedule.milestones_epochs=[1]", "schedule.noise_scale.enabled=true"],
    "decay": ["schedule.mode=decay_lr", "schedule.milestones_epochs=[1]", "schedule.noise_scale.enabled=false"],
}


@pytest.fixture(scope="module")
def store(small_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("schedule_report")
    uri = f"sqlite:///{root}/mlflow.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for name, overrides in RUNS.items():
        proc = subprocess.run(
            [sys.executable, "-m", "dist_train.cli", "train", str(REPO / "configs/demo.yaml"),
             f"data.shards={small_shards}", "train.epochs=1.5", "train.eval_every_epochs=1", "train.log_every_steps=1",
             "train.progress_bar=false", f"tracking.tracking_uri={uri}", "tracking.experiment=schedules",
             f"tracking.run_name={name}", f"train.run_dir={root}/{name}", "tracking.system_metrics=false", *overrides],
            cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root, uri


def test_the_schedule_figure_plots_the_logged_histories(store, tmp_path):
    from mlflow import MlflowClient

    root, uri = store
    report = make_report(experiments=["schedules"], out_dir=tmp_path / "out", tracking_uri=uri,
                         group_by=("schedule.mode",), log_to_mlflow=True)
    figure = tmp_path / "out" / "schedule.png"
    assert figure in report.files and figure.stat().st_size > 30_000
    client = MlflowClient(uri)
    plotted = {g[0]: runs[0] for g, runs in report.schedule.items()}  # one seed per mode
    assert set(plotted) == {"increase_batch", "decay_lr"}
    for mode, series in plotted.items():
        (run,) = client.search_runs([client.get_experiment_by_name("schedules").experiment_id],
                                    f"params.`schedule.mode` = '{mode}'")
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "global_batch_size"))
        assert list(series["global_batch_size"][1]) == [v for _, v in logged]  # the plotted B is the logged one
        measured = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "noise_scale/b_simple"))
        if mode == "decay_lr":
            assert not measured and "noise_scale/b_simple" not in series  # never measured: never plotted
        else:
            assert measured and list(series["noise_scale/b_simple"][1]) == [v for _, v in measured]
            assert len(measured) < len(logged) or len(measured) == len(logged)
        # The figure also sits beside the run's own metrics.
        assert "report/schedule.png" in [a.path for a in client.list_artifacts(run.info.run_id, "report")]
    grow_b = plotted["increase_batch"]["global_batch_size"][1]
    assert grow_b[0] == 128 and grow_b[-1] == 256  # the batch doubled at epoch 1
    assert set(plotted["decay_lr"]["global_batch_size"][1]) == {128}
    lrs = plotted["decay_lr"]["lr"][1]
    assert lrs[-1] < lrs[0]  # and this one decayed the lr instead
