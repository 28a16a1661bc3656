"""``dist-train report``: test accuracy of MLflow runs, grouped by setting, across seeds.

Runs are read back from the tracking store and grouped by a set of parameters (by default the
schedule mode, the optimizer and Lookahead's k); runs of one group that differ only in ``train.seed``
are its seeds. The report writes:

- ``acc_vs_epochs.png`` and ``acc_vs_updates.png``: ``eval/acc1`` against epochs and against parameter
  updates (the optimizer step every metric is logged at), one line per group: the mean over seeds with
  a band from the lowest to the highest seed;
- ``results.md``: per group the final test accuracy (mean +- sample standard deviation over seeds, and
  the number of seeds) and the number of updates;
- ``schedule.png``: the trajectory of every group against epochs, in stacked panels: lr, the global batch
  B, momentum, the analytic noise scale g (log axis), the measured B_simple beside B (log axis: the batch
  grows while B_simple is above it), and the train and eval loss. Seeds are bands as above; every group
  (schedule mode) overlays in each panel. B_simple appears only where the run measured it.

The trainer logs ``epoch`` every ``train.log_every_steps`` steps and always at the last step, while it
evaluates at epoch boundaries, so the epoch of an evaluation is interpolated linearly in the step
between the neighbouring ``epoch`` records. That is exact while the batch stays the same between them.

mlflow and matplotlib (Agg, no display) are imported only when a report is made.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

log = logging.getLogger(__name__)

DEFAULT_GROUP_BY = ("schedule.mode", "optim.name", "optim.lookahead.k")
SEED_PARAM = "train.seed"
ACCURACY_METRIC = "eval/acc1"
EPOCH_METRIC = "epoch"
REPORT_TAG = "dist_train.report"
"""Tag of the runs the report itself logs (``--log-to-mlflow``); they are never read back as training runs."""
MISSING = "-"
"""The value shown for a grouping parameter a run does not have (e.g. ``optim.lookahead.k`` without Lookahead)."""


@dataclass(frozen=True)
class RunCurve:
    """One training run's test-accuracy history."""

    run_id: str
    group: tuple[str, ...]
    seed: str
    steps: tuple[int, ...]
    """Optimizer steps of the evaluations, increasing."""
    epochs: tuple[float, ...]
    """Epoch at each evaluation (interpolated from the ``epoch`` metric); empty if it was never logged."""
    acc1: tuple[float, ...]
    """``eval/acc1`` at each evaluation, as a fraction."""

    @property
    def final_acc1(self) -> float:
        return self.acc1[-1]

    @property
    def updates(self) -> int:
        """Optimizer steps at the last evaluation: the end of training, where the trainer always evaluates."""
        return self.steps[-1]


@dataclass(frozen=True)
class GroupSummary:
    """The seeds of one setting."""

    group: tuple[str, ...]
    runs: tuple[RunCurve, ...]

    @property
    def acc1_mean(self) -> float:
        return statistics.fmean(r.final_acc1 for r in self.runs)

    @property
    def acc1_std(self) -> float | None:
        """Sample standard deviation (n - 1) of the final accuracy over seeds; None for a single seed."""
        return statistics.stdev(r.final_acc1 for r in self.runs) if len(self.runs) > 1 else None

    @property
    def updates(self) -> tuple[int, ...]:
        return tuple(r.updates for r in self.runs)

    @property
    def final_epoch_mean(self) -> float | None:
        epochs = [r.epochs[-1] for r in self.runs if r.epochs]
        return statistics.fmean(epochs) if epochs else None


@dataclass(frozen=True)
class Report:
    groups: tuple[GroupSummary, ...]
    group_by: tuple[str, ...]
    files: tuple[Path, ...]
    mlflow_run_id: str | None = None
    schedule: dict[tuple[str, ...], list[dict[str, tuple[tuple[float, ...], tuple[float, ...]]]]] | None = None
    """What ``schedule.png`` plots: per group, per run (in the group's seed order), each metric's series."""


# --- reading runs ------------------------------------------------------------------------------
def _client(tracking_uri: str | None) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from dist_train.config import TrackingConfig
    from dist_train.tracking import resolve_tracking_uri

    return MlflowClient(tracking_uri=tracking_uri or resolve_tracking_uri(TrackingConfig()))


def _experiment_ids(client: Any, names: Sequence[str]) -> list[str]:
    ids, missing = [], []
    for name in names:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            missing.append(name)
        else:
            ids.append(experiment.experiment_id)
    if missing:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment named {missing} in {client.tracking_uri}; it has {known}")
    return ids


def _search_runs(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _epochs_at(client: Any, run_id: str, steps: list[int]) -> tuple[float, ...]:
    import numpy as np

    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, EPOCH_METRIC))
    if not history:
        return ()
    logged_steps, logged_epochs = zip(*history)
    return tuple(float(e) for e in np.interp(steps, logged_steps, logged_epochs))


def _curve(client: Any, run: Any, group_by: Sequence[str]) -> RunCurve | None:
    """``run``'s accuracy history, or None (with a warning) when it never evaluated."""
    info, params = run.info, run.data.params
    history = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(info.run_id, ACCURACY_METRIC))
    if not history:
        log.warning("run %s (%s) has no %s: left out", info.run_id, info.run_name, ACCURACY_METRIC)
        return None
    by_step = {step: value for step, _, value in history}  # a step evaluated twice (a resumed run): the latest
    steps = sorted(by_step)
    return RunCurve(run_id=info.run_id, group=tuple(params.get(key, MISSING) for key in group_by),
                    seed=params.get(SEED_PARAM, MISSING), steps=tuple(steps),
                    epochs=_epochs_at(client, info.run_id, steps), acc1=tuple(by_step[s] for s in steps))


def load_runs(client: Any, *, experiments: Sequence[str], filter_string: str = "",
              group_by: Sequence[str] = DEFAULT_GROUP_BY, include_unfinished: bool = False) -> list[RunCurve]:
    """The runs of ``experiments`` that match ``filter_string`` (MLflow search syntax), as curves.

    Skipped with a warning: runs that are not FINISHED (unless ``include_unfinished``), runs without any
    ``eval/acc1``, and all but the latest started of several runs with the same group and seed.
    """
    latest: dict[tuple[tuple[str, ...], str], tuple[int, RunCurve]] = {}
    for run in _search_runs(client, _experiment_ids(client, experiments), filter_string):
        if REPORT_TAG in run.data.tags:
            continue
        if run.info.status != "FINISHED" and not include_unfinished:
            log.warning("run %s (%s) is %s: left out (pass --include-unfinished to keep it)", run.info.run_id,
                        run.info.run_name, run.info.status)
            continue
        curve = _curve(client, run, group_by)
        if curve is None:
            continue
        key = (curve.group, curve.seed)
        if key in latest:
            log.warning("runs %s and %s share %s and seed %s: keeping the one started later", latest[key][1].run_id,
                        curve.run_id, dict(zip(group_by, curve.group)), curve.seed)
            if latest[key][0] > run.info.start_time:
                continue
        latest[key] = (run.info.start_time, curve)
    return [curve for _, curve in latest.values()]


def summarise(runs: Sequence[RunCurve]) -> tuple[GroupSummary, ...]:
    """One summary per group, sorted by group; runs within a group sorted by seed."""
    groups: dict[tuple[str, ...], list[RunCurve]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return tuple(GroupSummary(group=g, runs=tuple(sorted(rs, key=lambda r: _seed_order(r.seed))))
                 for g, rs in sorted(groups.items()))


def _seed_order(seed: str) -> tuple[int, Any]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


# --- the table ---------------------------------------------------------------------------------
def _format_updates(updates: tuple[int, ...]) -> str:
    if len(set(updates)) == 1:
        return str(updates[0])
    return f"{statistics.fmean(updates):.0f} ({min(updates)}-{max(updates)})"


def markdown_table(groups: Sequence[GroupSummary], *, group_by: Sequence[str]) -> str:
    """Final test accuracy (mean +- std over seeds, n seeds) and updates, one row per group."""
    header = [*group_by, "seeds", "final test acc1 (%)", "updates", "epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        epochs = "" if g.final_epoch_mean is None else f"{g.final_epoch_mean:.2f}"
        spread = "(one seed: no spread)" if g.acc1_std is None else f"± {100 * g.acc1_std:.2f}"
        cells = [*g.group, str(len(g.runs)), f"{100 * g.acc1_mean:.2f} {spread}",
                 _format_updates(g.updates), epochs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _results_markdown(groups: Sequence[GroupSummary], *, group_by: Sequence[str], experiments: Sequence[str],
                      filter_string: str) -> str:
    runs = sum(len(g.runs) for g in groups)
    where = f" matching `{filter_string}`" if filter_string else ""
    return (
        f"# Test accuracy by setting\n\n"
        f"MLflow experiment(s) {', '.join(f'`{e}`' for e in experiments)}{where}: {runs} runs in {len(groups)} "
        f"groups by {', '.join(f'`{k}`' for k in group_by)}, seeds from `{SEED_PARAM}`.\n\n"
        f"- **final test acc1**: `{ACCURACY_METRIC}` at each run's last evaluation (the end of training), as the "
        f"mean ± sample standard deviation (n − 1) over seeds.\n"
        f"- **updates**: optimizer steps at the end of training; several values give the mean (min-max).\n"
        f"- **epochs**: training length in epochs, mean over seeds.\n\n"
        f"{markdown_table(groups, group_by=group_by)}\n"
        f"![test accuracy against epochs](acc_vs_epochs.png)\n\n"
        f"![test accuracy against parameter updates](acc_vs_updates.png)\n\n"
        f"![lr, batch, momentum, noise scale and loss against epochs](schedule.png)\n"
    )


# --- the plots ---------------------------------------------------------------------------------
def group_label(group: Sequence[str], group_by: Sequence[str]) -> str:
    """``mode=hybrid, optim=radam, k=5``: the last part of each key (the section for ``*.name``)."""
    parts = []
    for key, value in zip(group_by, group):
        if value == MISSING:
            continue
        names = key.split(".")
        short = names[-2] if names[-1] == "name" and len(names) > 1 else names[-1]
        parts.append(f"{short}={value}")
    return ", ".join(parts) or "all runs"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def mean_band(xs: Sequence[Sequence[float]], ys: Sequence[Sequence[float]]) -> tuple[Any, Any, Any, Any]:
    """Curves on a common x grid: (grid, mean, min, max) over the curves.

    The grid holds every x of every curve within the range all curves cover; each curve is interpolated
    linearly onto it, which changes nothing when the curves share their x values (seeds of a fixed
    schedule), and lines up seeds whose evaluations fall at different steps (adaptive batch growth).
    """
    import numpy as np

    lo, hi = max(min(x) for x in xs), min(max(x) for x in xs)
    grid = np.unique(np.concatenate([np.asarray(x, dtype=float) for x in xs]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    values = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def plot_accuracy(groups: Sequence[GroupSummary], *, group_by: Sequence[str], x_axis: Literal["epochs", "updates"],
                  path: Path, title: str) -> Path:
    """One line per group (mean over seeds) with a min-max band, written as a PNG."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    for i, g in enumerate(groups):
        runs = [r for r in g.runs if x_axis == "updates" or r.epochs]
        if not runs:
            log.warning("%s: no epoch metric logged, left out of the plot against epochs", g.group)
            continue
        xs = [r.steps if x_axis == "updates" else r.epochs for r in runs]
        grid, mean, low, high = mean_band(xs, [[100 * a for a in r.acc1] for r in runs])
        color = colors(i % colors.N)
        ax.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
        ax.plot(grid, mean, color=color, marker="o", markersize=2.5, linewidth=1.5,
                label=f"{group_label(g.group, group_by)} ({_seeds(len(runs))})")
    ax.set_xlabel("epochs" if x_axis == "epochs" else "parameter updates (optimizer steps)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"{title}\nmean over seeds; band: lowest to highest seed", fontsize="medium")
    ax.grid(True, alpha=0.3)
    fig.legend(fontsize="small", loc="outside right upper")  # beside the axes: never over a curve
    fig.savefig(path)
    return path


# --- the schedule figure ----------------------------------------------------------------------
SCHEDULE_PANELS = (  # (metric, y label, log axis)
    ("lr", "learning rate", False),
    ("global_batch_size", "global batch B", True),
    ("momentum", "momentum", False),
    ("noise_scale/analytic", "analytic noise scale g", True),
    ("noise_scale/b_simple", "measured B_simple (dashed: B)", True),
    ("train/loss", "loss (solid: train, dotted: eval)", False),
)


def schedule_series(client: Any, run_id: str) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Each schedule metric of a run as (epochs, values), in step order, the epoch interpolated from the
    ``epoch`` history as for the accuracy; a metric the run never logged is absent (B_simple without the
    noise scale, or before its first measurement)."""
    out = {}
    for key in [k for k, _, _ in SCHEDULE_PANELS] + ["eval/loss"]:
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
        if not by_step:
            continue
        steps = sorted(by_step)
        epochs = _epochs_at(client, run_id, steps)
        if epochs:
            out[key] = (epochs, tuple(by_step[s] for s in steps))
    return out


def plot_schedule(client: Any, groups: Sequence[GroupSummary], *, group_by: Sequence[str], path: Path,
                  title: str) -> dict[tuple[str, ...], list[dict[str, tuple[tuple[float, ...], tuple[float, ...]]]]]:
    """Write the stacked schedule panels of every group to ``path``; returns the series plotted, per group and
    run (what a test can hold against the logged histories)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 2.3 * len(SCHEDULE_PANELS)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(SCHEDULE_PANELS), 1, sharex=True)
    colors = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    plotted = {}
    for i, g in enumerate(groups):
        color = colors(i % colors.N)
        series = [schedule_series(client, r.run_id) for r in g.runs]
        plotted[g.group] = series
        label: str | None = f"{group_label(g.group, group_by)} ({_seeds(len(g.runs))})"
        for ax, (key, _, _) in zip(axes, SCHEDULE_PANELS):
            if _band(ax, [s[key] for s in series if key in s], color=color, label=label):
                label = None  # the group's legend entry, once, on the first panel it has data for
            if key == "noise_scale/b_simple":  # B beside it: grow while the solid line is above the dashed
                _band(ax, [s["global_batch_size"] for s in series if "global_batch_size" in s], color=color,
                      linestyle="--")
            if key == "train/loss":
                _band(ax, [s["eval/loss"] for s in series if "eval/loss" in s], color=color, linestyle=":")
    for ax, (_, ylabel, log_axis) in zip(axes, SCHEDULE_PANELS):
        ax.set_ylabel(ylabel, fontsize="small")
        ax.grid(True, alpha=0.3)
        if log_axis:
            ax.set_yscale("log")
    axes[-1].set_xlabel("epochs")
    axes[0].set_title(f"{title}\nmean over seeds; band: lowest to highest seed", fontsize="medium")
    fig.legend(fontsize="small", loc="outside right upper")
    fig.savefig(path)
    return plotted


def _band(ax: Any, curves: list[tuple[tuple[float, ...], tuple[float, ...]]], *, color: Any,
          label: str | None = None, linestyle: str = "-") -> bool:
    """Mean over ``curves`` with a min-max band; False (nothing drawn) without curves."""
    if not curves:
        return False
    grid, mean, low, high = mean_band([c[0] for c in curves], [c[1] for c in curves])
    if len(curves) > 1:
        ax.fill_between(grid, low, high, color=color, alpha=0.15, linewidth=0)
    ax.plot(grid, mean, color=color, linewidth=1.3, linestyle=linestyle, label=label)
    return True


# --- the whole report --------------------------------------------------------------------------
def make_report(*, experiments: Sequence[str], out_dir: str | Path, tracking_uri: str | None = None,
                filter_string: str = "", group_by: Sequence[str] = DEFAULT_GROUP_BY,
                include_unfinished: bool = False, log_to_mlflow: bool = False,
                mlflow_experiment: str | None = None) -> Report:
    """Read the runs, write the plots and the table to ``out_dir``, optionally log them to a new MLflow run."""
    client = _client(tracking_uri)
    group_by = tuple(group_by)
    runs = load_runs(client, experiments=experiments, filter_string=filter_string, group_by=group_by,
                     include_unfinished=include_unfinished)
    if not runs:
        raise ValueError(f"no finished run with {ACCURACY_METRIC} in experiment(s) {list(experiments)}"
                         + (f" matching {filter_string!r}" if filter_string else ""))
    groups = summarise(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = ", ".join(experiments)
    files: tuple[Path, ...] = (
        plot_accuracy(groups, group_by=group_by, x_axis="epochs", path=out / "acc_vs_epochs.png",
                      title=f"Test accuracy against epochs ({name})"),
        plot_accuracy(groups, group_by=group_by, x_axis="updates", path=out / "acc_vs_updates.png",
                      title=f"Test accuracy against parameter updates ({name})"),
    )
    schedule = plot_schedule(client, groups, group_by=group_by, path=out / "schedule.png",
                             title=f"Schedule: lr, batch, momentum, noise scale and loss against epochs ({name})")
    files += (out / "schedule.png",)
    table = out / "results.md"
    table.write_text(_results_markdown(groups, group_by=group_by, experiments=experiments,
                                       filter_string=filter_string))
    files += (table,)
    run_id = None
    if log_to_mlflow:
        run_id = _log_report(client, files, experiment=mlflow_experiment or experiments[0], group_by=group_by,
                             experiments=experiments, filter_string=filter_string)
        for g in groups:  # beside each training run's own metrics too
            for r in g.runs:
                for path in files:
                    if path.suffix == ".png":
                        client.log_artifact(r.run_id, str(path), artifact_path="report")
    return Report(groups=groups, group_by=group_by, files=files, mlflow_run_id=run_id, schedule=schedule)


def _log_report(client: Any, files: Sequence[Path], *, experiment: str, group_by: Sequence[str],
                experiments: Sequence[str], filter_string: str) -> str:
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name="report", tags={REPORT_TAG: "true"})
    run_id = run.info.run_id
    for key, value in (("report.experiments", ",".join(experiments)), ("report.group_by", ",".join(group_by)),
                       ("report.filter", filter_string or "")):
        client.log_param(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="report")
    client.set_terminated(run_id, status="FINISHED")
    return run_id


# --- the command line --------------------------------------------------------------------------
def _report_command(args: argparse.Namespace) -> int:
    import sys

    group_by = tuple(k.strip() for k in args.group_by.split(",") if k.strip())
    out_dir = args.out or Path("reports") / args.experiment[0]
    try:
        report = make_report(experiments=args.experiment, out_dir=out_dir, tracking_uri=args.tracking_uri,
                             filter_string=args.filter, group_by=group_by,
                             include_unfinished=args.include_unfinished, log_to_mlflow=args.log_to_mlflow,
                             mlflow_experiment=args.mlflow_experiment)
    except ValueError as err:
        print(f"dist-train report: {err}", file=sys.stderr)
        return 2
    print(markdown_table(report.groups, group_by=report.group_by), end="")
    print("wrote " + ", ".join(str(p) for p in report.files))
    if report.mlflow_run_id:
        print(f"logged to MLflow run {report.mlflow_run_id}")
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on the ``dist-train`` sub-command parsers."""
    p = subparsers.add_parser("report", help="plot and tabulate test accuracy of MLflow runs, grouped across seeds",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", action="append", required=True, metavar="NAME",
                   help="MLflow experiment to read; repeat for several")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db)")
    p.add_argument("--filter", default="", metavar="STRING",
                   help="MLflow search filter, e.g. \"params.optim.name = 'sgd'\"")
    p.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY), metavar="KEYS",
                   help=f"comma-separated run parameters that define a group (default: {','.join(DEFAULT_GROUP_BY)}); "
                        f"runs of a group differ in {SEED_PARAM}")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: reports/<experiment>)")
    p.add_argument("--include-unfinished", action="store_true", help="also read runs that are not FINISHED")
    p.add_argument("--log-to-mlflow", action="store_true", help="log the PNGs and the table to a new MLflow run")
    p.add_argument("--mlflow-experiment", default=None, metavar="NAME",
                   help="experiment of that run (default: the first --experiment)")
    p.set_defaults(func=_report_command)
    return p
