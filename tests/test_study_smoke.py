"""The Fashion-MNIST seed study (benchmarks/study_fashion_mnist.py): its batches, and a smoke run of every setting.

The smoke run trains each setting of both parts (10 schedule settings, 6 warmup settings) for 2 steps of
a tiny model on the small shards, tracked in a temporary MLflow store, then writes the report: every code
path of the study, in seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dist_train.report import REPORT_TAG

REPO = Path(__file__).resolve().parents[1]
NOT_REPORT = "attributes.run_name != 'report'"  # the training runs, not the report's own run


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


def test_planned_batches_walk_the_cosine_modes(study):
    # Not settings of the study (its protocol is Smith's milestones), but the check must not pass them blindly.
    cosine = study.Setting("cosine-sgd", ("schedule.mode=cosine", *study.OPTIMIZERS["sgd"]))
    assert study.planned_batches(cosine) == [128]
    twin = ("schedule.mode=increase_batch_cosine", "schedule.max_global_batch_size=16000", *study.OPTIMIZERS["sgd"])
    with pytest.raises(UserWarning, match="rounded at every step"):  # 64 / (2 x 128): g up to 25% off
        study.planned_batches(study.Setting("twin-sgd", twin))
    batches = study.planned_batches(study.Setting("twin-sgd", (*twin, "train.global_batch_size=6400")))
    assert batches[0] == 6400 and batches[-1] == 16000 and batches == sorted(batches)
    assert all(b % 64 == 0 for b in batches) and len(batches) > 10


def test_a_run_that_dies_by_a_signal_fails_only_its_own_setting(study, tmp_path, monkeypatch):
    # A native crash (the oneDNN bug of docs/cpu.md was one) kills the process of one run: the runs beside
    # and after it still train, and the crashed one is reported by its signal.
    def command(overrides):
        run_dir = Path(study._value(overrides, "train.run_dir"))
        if run_dir.name == "crash":
            return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGBUS)"]
        summary = json.dumps({"eval/acc1": 0.5, "step": 2})
        return [sys.executable, "-c", f"import pathlib; d = pathlib.Path({str(run_dir)!r}); d.mkdir(parents=True); "
                                      f"(d / 'summary.json').write_text({summary!r})"]

    monkeypatch.setattr(study, "train_command", command)
    jobs = [(name, [f"train.run_dir={tmp_path / name}"]) for name in ("before", "crash", "after", "beside")]
    assert study.run_all(jobs, parallel=2) == ["crash"]
    assert all((tmp_path / name / "summary.json").is_file() for name in ("before", "after", "beside"))


def test_smoke_runs_every_setting_and_writes_the_report(study, small_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = study.main(["--smoke", "--jobs", "2", "--shards", str(small_shards), "--tracking-uri", uri, "--run-root",
                     str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    assert rc == 0

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("study_fashion_mnist_smoke")
    runs = client.search_runs([experiment.experiment_id], filter_string=NOT_REPORT)
    assert len(runs) == 10 and {r.info.status for r in runs} == {"FINISHED"}
    # The plots and the table are logged to MLflow too, in a run of their own.
    (report_run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{REPORT_TAG}` = 'true'")
    assert sorted(a.path for a in client.list_artifacts(report_run.info.run_id, "report")) == [
        "report/acc_vs_epochs.png", "report/acc_vs_updates.png", "report/results.md", "report/schedule.png"]
    assert {r.data.params["train.seed"] for r in runs} == {"0"}
    assert {int(r.data.metrics["final/step"]) for r in runs} == {2}
    modes = {r.info.run_name: r.data.params["schedule.mode"] for r in runs}
    assert modes["adaptive-sgd-seed0"] == "adaptive" and modes["hybrid-radam_lookahead-seed0"] == "hybrid"

    table = (tmp_path / "report" / "results.md").read_text()
    assert table.count("| 1 | ") == 10  # one row per setting, one seed each
    assert table.count("(one seed: no spread)") == 10  # no made-up "± 0.00"
    for png in ("acc_vs_epochs.png", "acc_vs_updates.png", "schedule.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Finished runs are skipped: a second call trains nothing and rewrites the report.
    assert study.main(["--smoke", "--shards", str(small_shards), "--tracking-uri", uri, "--run-root",
                       str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--only", "adaptive"]) == 0
    assert len(client.search_runs([experiment.experiment_id], filter_string=NOT_REPORT)) == 10


# --- part 2: warmup at B=3200 ------------------------------------------------------------------
def test_warmup_part_runs_three_optimizers_with_and_without_warmup_at_one_large_batch(study):
    names = [s.name for s in study.warmup_settings()]
    optimizers = ("sgd", "adamw", "radam", "adamw_linear_lr", "radam_linear_lr")
    assert sorted(names) == sorted([*(f"b3200-{o}-{w}" for o in optimizers for w in ("no_warmup", "warmup")),
                                    "b3200-radam_beta2_0.99-no_warmup"])
    for setting in study.warmup_settings():
        for world_size in (1, 2):
            assert study.planned_batches(setting, world_size=world_size) == [3200] * 4, setting.name


@pytest.mark.parametrize("optimizer, target_lr", [("sgd", 0.1 * 3200 / 128), ("adamw", 3e-3 * 5), ("radam", 3e-3 * 5),
                                                  ("adamw_linear_lr", 3e-3 * 25), ("radam_linear_lr", 3e-3 * 25)])
def test_warmup_part_lr_path_is_the_scaling_rule_then_milestones(study, optimizer, target_lr):
    # SGD scales linearly from B=128 (0.1 -> 2.5), the Adam family by the square root (3e-3 -> 0.015). With
    # warmup the lr ramps linearly over the first epoch from 1/25 of the target; both then fall by 5 at
    # epochs 1.5, 3 and 4.
    from dist_train.config import load_config
    from dist_train.schedule import Schedule, optimizer_family

    n = study.N_TRAIN
    for warm in (False, True):
        name = f"b3200-{optimizer}-{'warmup' if warm else 'no_warmup'}"
        setting = next(s for s in study.warmup_settings() if s.name == name)
        cfg = load_config(None, [*study.COMMON, *setting.overrides])
        assert cfg.optim.name == optimizer.split("_")[0] and cfg.train.global_batch_size == 3200
        schedule = Schedule(cfg.schedule, base_lr=cfg.optim.lr, base_momentum=cfg.optim.momentum,
                            base_global_batch_size=cfg.train.global_batch_size, dataset_size=n,
                            optimizer_family=optimizer_family(cfg.optim.name), batch_granularity=64)
        lr_at = {epoch: schedule.state_at(round(epoch * n)).lr for epoch in (0.0, 0.5, 1.0, 1.6, 3.1, 4.1)}
        start = target_lr / 25 if warm else target_lr
        middle = (start + target_lr) / 2 if warm else target_lr
        assert lr_at[0.0] == pytest.approx(start) and lr_at[0.5] == pytest.approx(middle), name
        assert lr_at[1.0] == pytest.approx(target_lr), name
        assert [lr_at[e] for e in (1.6, 3.1, 4.1)] == pytest.approx([target_lr / 5, target_lr / 25, target_lr / 125])


def test_warmup_part_smoke_groups_by_optimizer_and_warmup(study, small_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert study.main(["--part", "warmup", "--smoke", "--jobs", "2", "--shards", str(small_shards), "--tracking-uri", uri,
                       "--run-root", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("study_fashion_mnist_warmup_smoke").experiment_id],
                              filter_string=NOT_REPORT)
    assert len(runs) == 11 and {r.info.status for r in runs} == {"FINISHED"}
    keys = ("optim.name", "optim.beta2", "schedule.lr_scaling", "schedule.warmup_epochs")
    assert {tuple(r.data.params[k] for k in keys) for r in runs} == {
        *((o, "0.999", "linear" if o == "sgd" else "sqrt", w) for o in ("sgd", "adamw", "radam") for w in ("0.0", "1.0")),
        *((o, "0.999", "linear", w) for o in ("adamw", "radam") for w in ("0.0", "1.0")), ("radam", "0.99", "sqrt", "0.0")}
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| optim.name | optim.beta2 | schedule.lr_scaling | schedule.warmup_epochs | seeds |" in table
    assert table.count("| 2 | ") == 11  # 2 updates per run, one row per setting


# --- part 3: Lookahead(RAdam) at twice the lr -------------------------------------------------
def test_lookahead_lr_part_reports_beside_part_one_decay_lr_radam_runs(study, small_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--smoke", "--shards", str(small_shards), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
              "--run-root", str(tmp_path / "runs")]
    # Part 1's decay_lr runs with RAdam and Lookahead(RAdam), and a non-RAdam run the filter must drop.
    assert study.main([*common, "--only", "decay_lr-radam", "decay_lr-sgd", "--out", str(tmp_path / "r1")]) == 0
    assert study.main([*common, "--part", "lookahead_lr", "--out", str(tmp_path / "r3")]) == 0
    table = (tmp_path / "r3" / "results.md").read_text()
    assert "| optim.name | optim.lookahead.k | optim.lr | seeds |" in table
    rows = [line for line in table.splitlines() if line.startswith("| radam |")]
    assert sorted(r.split(" | ")[1:3] for r in rows) == [["-", "0.003"], ["-", "0.006"], ["5", "0.003"], ["5", "0.006"]]
    assert "sgd" not in table.split("| optim.name |", 1)[1]


# --- parts 4 and 5: the cosine twin, and the preconditioned noise scale ---------------------------
def test_cosine_part_pairs_each_optimizer_with_the_cosine_and_its_twin(study):
    from dist_train.config import check, load_config

    settings = {s.name: s for s in study.cosine_settings()}
    assert sorted(settings) == ["cosine-radam", "cosine-sgd", "increase_batch_cosine-radam",
                                "increase_batch_cosine-sgd"]
    for name, setting in settings.items():
        cfg = load_config(None, [*study.COMMON, *setting.overrides])
        check(cfg, world_size=1)
        assert cfg.train.micro_batch_size == 16 and cfg.train.global_batch_size == 128
        batches = study.planned_batches(setting, twin_rounding=True)
        if name.startswith("cosine"):
            assert batches == [128]
        else:  # 128 / c(t) in steps of 16 up to the ladder's top
            assert batches[0] == 128 and batches[-1] == 16000 and all(b % 16 == 0 for b in batches)


def test_preconditioned_part_differs_only_in_the_estimate(study):
    from dist_train.config import check, load_config

    raw, pre = (load_config(None, [*study.COMMON, *s.overrides]) for s in study.preconditioned_settings())
    for cfg in (raw, pre):
        check(cfg, world_size=1)
        assert cfg.schedule.mode == "adaptive" and cfg.optim.name == "radam"
    assert (raw.schedule.noise_scale.preconditioned, pre.schedule.noise_scale.preconditioned) == (False, True)
    assert dataclasses.replace(pre.schedule, noise_scale=raw.schedule.noise_scale) == raw.schedule
