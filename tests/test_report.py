"""`dist-train report` on a real (sqlite) MLflow store holding synthetic runs with known histories.

Two groups x three seeds, logged the way the trainer logs them: params from the flattened config,
``epoch`` every 10 steps and at the last step, ``eval/acc1`` at epoch boundaries and at the end.
"""

from __future__ import annotations

import argparse
import math
import struct

import pytest

from dist_train.report import add_report_parser, make_report, mean_band

EXPERIMENT = "study"
# (params, epochs per step, eval steps, accuracy per seed at each eval step)
GROUP_A = ({"schedule.mode": "decay_lr", "optim.name": "sgd", "optim.lookahead": "None"}, 1 / 100, (100, 200, 300),
           {0: (0.50, 0.70, 0.80), 1: (0.52, 0.72, 0.82), 2: (0.54, 0.74, 0.84)})
GROUP_B = ({"schedule.mode": "increase_batch", "optim.name": "radam", "optim.lookahead.k": "5",
            "optim.lookahead.alpha": "0.5"}, 1 / 30, (30, 45, 90),
           {0: (0.40, 0.60, 0.70), 1: (0.45, 0.61, 0.71), 2: (0.50, 0.65, 0.75)})


def _log_run(client, experiment_id, params, epochs_per_step, eval_steps, accuracies, *, seed, finish=True):
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, run_name=f"{params['schedule.mode']}-{seed}")
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in {**params, "train.seed": str(seed)}.items()])
    last = eval_steps[-1] if eval_steps else 100
    metrics = [Metric("epoch", s * epochs_per_step, 0, s) for s in range(10, last + 1, 10)]
    metrics += [Metric("eval/acc1", a, 0, s) for s, a in zip(eval_steps, accuracies)]
    metrics += [Metric("train/loss", 1.0, 0, s) for s in range(10, last + 1, 10)]
    client.log_batch(run_id, metrics=metrics)
    if finish:
        client.set_terminated(run_id, status="FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with the two groups, plus runs the report must leave out."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    for params, per_step, steps, by_seed in (GROUP_A, GROUP_B):
        for seed, accuracies in by_seed.items():
            _log_run(client, exp, params, per_step, steps, accuracies, seed=seed)
    # Left out: a run still going, a run that never evaluated, a report run, a run of another experiment.
    _log_run(client, exp, GROUP_A[0], 1 / 100, (100,), (0.99,), seed=3, finish=False)
    _log_run(client, exp, GROUP_A[0], 1 / 100, (), (), seed=4)
    client.set_terminated(client.create_run(exp, tags={"dist_train.report": "true"}).info.run_id)
    other = client.create_experiment("other", artifact_location=str(root / "artifacts"))
    _log_run(client, other, GROUP_A[0], 1 / 100, (100,), (0.01,), seed=0)
    return root, uri


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def test_table_gives_mean_std_seeds_and_updates_per_group(store, tmp_path):
    root, uri = store
    report = make_report(experiments=[EXPERIMENT], out_dir=tmp_path / "out", tracking_uri=uri)
    by_mode = {g.group[0]: g for g in report.groups}
    assert sorted(by_mode) == ["decay_lr", "increase_batch"]
    a, b = by_mode["decay_lr"], by_mode["increase_batch"]
    assert a.group == ("decay_lr", "sgd", "-") and b.group == ("increase_batch", "radam", "5")
    assert [r.seed for r in a.runs] == ["0", "1", "2"] == [r.seed for r in b.runs]
    # A: 0.80, 0.82, 0.84 -> mean 0.82, sample std 0.02. B: 0.70, 0.71, 0.75 -> 0.72, sqrt(14 / 2) / 100.
    assert a.acc1_mean == pytest.approx(0.82) and a.acc1_std == pytest.approx(0.02)
    assert b.acc1_mean == pytest.approx(0.72) and b.acc1_std == pytest.approx(math.sqrt(7) / 100)
    assert a.updates == (300, 300, 300) and b.updates == (90, 90, 90)
    # Evaluation epochs: logged at 100 and 200 for A; for B step 45 lies between the records at 40 and 50.
    assert a.runs[0].epochs == pytest.approx((1.0, 2.0, 3.0))
    assert b.runs[0].epochs == pytest.approx((1.0, 1.5, 3.0))

    table = (tmp_path / "out" / "results.md").read_text()
    header = "| schedule.mode | optim.name | optim.lookahead.k | seeds | final test acc1 (%) | updates | epochs |"
    assert header in table
    assert "| decay_lr | sgd | - | 3 | 82.00 ± 2.00 | 300 | 3.00 |" in table
    assert "| increase_batch | radam | 5 | 3 | 72.00 ± 2.65 | 90 | 3.00 |" in table


def test_plots_are_real_pngs(store, tmp_path):
    root, uri = store
    report = make_report(experiments=[EXPERIMENT], out_dir=tmp_path / "out", tracking_uri=uri)
    pngs = [p for p in report.files if p.suffix == ".png"]
    assert [p.name for p in pngs] == ["acc_vs_epochs.png", "acc_vs_updates.png", "schedule.png"]
    for png in pngs[:2]:
        assert _png_size(png) == (1440, 660)  # 12 x 5.5 inches at 120 dpi
        assert png.stat().st_size > 20_000  # axes, two bands, two lines, legend: not an empty canvas
        from PIL import Image

        with Image.open(png) as image:
            image.verify()


def test_cli_writes_the_report_and_logs_it_to_mlflow(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    root, uri = store
    parser = argparse.ArgumentParser(prog="dist-train")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out",
                              str(tmp_path / "cli"), "--filter", "params.optim.name = 'sgd'", "--log-to-mlflow"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| decay_lr | sgd | - | 3 | 82.00 ± 2.00 | 300 | 3.00 |" in out and "increase_batch" not in out
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["acc_vs_epochs.png", "acc_vs_updates.png",
                                                                   "results.md", "schedule.png"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'report'")
    assert run.data.tags["dist_train.report"] == "true"
    assert run.data.params["report.filter"] == "params.optim.name = 'sgd'"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "report")) == [
        "report/acc_vs_epochs.png", "report/acc_vs_updates.png", "report/results.md", "report/schedule.png"]


def test_unknown_experiment_is_a_clear_error(store, tmp_path, capsys):
    root, uri = store
    with pytest.raises(ValueError, match=r"no MLflow experiment named \['nope'\].*'other'"):
        make_report(experiments=["nope"], out_dir=tmp_path, tracking_uri=uri)


def test_mean_band_lines_up_seeds_evaluated_at_different_steps():
    # Seeds of an adaptive run evaluate at different steps: both are interpolated onto the shared range.
    grid, mean, low, high = mean_band([[10, 20, 30], [15, 30, 40]], [[1.0, 2.0, 3.0], [2.0, 4.0, 5.0]])
    assert list(grid) == [15, 20, 30]
    assert list(low) == [1.5, 2.0, 3.0] and list(high) == [2.0, 8 / 3, 4.0]
    assert list(mean) == pytest.approx([1.75, (2.0 + 8 / 3) / 2, 3.5])
