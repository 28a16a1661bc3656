"""The cosine schedule and its batch-growth twin on a 90-epoch ImageNet-like run: lr, B and g against epochs.

Momentum SGD (lr 0.1, m 0.9) from B0 = 256 on N = 1,281,167 images, 5 warmup epochs, a cosine to 0 over 90
epochs. ``cosine`` keeps B; ``increase_batch_cosine`` grows B as B0 / c up to a cap of 32,768 (128 x B0) and
lets the lr take over from there. The twin is drawn at two batch granularities (micro_batch_size x world
size): 256 (micro 32 on 8 GPUs, where the first growth steps are whole multiples of B0) and 32. The figure
goes to docs/schedule/cosine_twin.png; the update counts of each run, walked step by step as the trainer
takes them, are printed (docs/schedule.md quotes them). About 10 s on one core; needs matplotlib.

    .venv/bin/python benchmarks/plot_cosine_twin.py [--out docs/schedule/cosine_twin.png]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from dist_train.schedule import Schedule, ScheduleConfig  # noqa: E402

N = 1_281_167
EPOCHS = 90.0
WARMUP_EPOCHS = 5.0
B0, CAP = 256, 32_768
LR, MOMENTUM = 0.1, 0.9
RUNS = {  # label: (mode, batch granularity)
    "cosine": ("cosine", 256),
    "increase_batch_cosine, G=256": ("increase_batch_cosine", 256),
    "increase_batch_cosine, G=32": ("increase_batch_cosine", 32),
}


def schedule(mode: str, granularity: int) -> Schedule:
    cap = {"max_global_batch_size": CAP} if mode == "increase_batch_cosine" else {}
    cfg = ScheduleConfig(mode=mode, warmup_epochs=WARMUP_EPOCHS, **cap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the twin's rounding warning: the figure shows that error
        return Schedule(cfg, base_lr=LR, base_momentum=MOMENTUM, base_global_batch_size=B0, dataset_size=N,
                        optimizer_family="sgd", batch_granularity=granularity, total_epochs=EPOCHS)


def update_count(sched: Schedule) -> int:
    """Optimizer steps of the whole run: samples_seen += B after each, until EPOCHS x N are seen."""
    samples = steps = 0
    while samples < math.ceil(EPOCHS * N):
        samples += sched.state_at(samples).global_batch_size
        steps += 1
    return steps


def analytic_ratio() -> float:
    """Twin steps / cosine steps without rounding: the warmup at B0, then the mean over the cosine of
    max(c, B0 / cap), c = (1 + cos(pi p)) / 2; c reaches B0 / cap at cos(pi p*) = 2 B0 / cap - 1."""
    floor = B0 / CAP
    p_star = math.acos(2 * floor - 1) / math.pi
    mean = p_star / 2 + math.sin(math.pi * p_star) / (2 * math.pi) + floor * (1 - p_star)
    return (WARMUP_EPOCHS + (EPOCHS - WARMUP_EPOCHS) * mean) / EPOCHS


def curves(sched: Schedule, epochs: list[float]) -> dict[str, list[float]]:
    states = [sched.state_at(round(e * N)) for e in epochs]
    return {"lr": [s.lr for s in states], "B": [s.global_batch_size for s in states],
            "g": [s.noise_scale for s in states]}


def plot(out: Path, counts: dict[str, int]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [EPOCHS * i / 9000 for i in range(9001)]
    data = {label: curves(schedule(*run), epochs) for label, run in RUNS.items()}
    reference = data["cosine"]["g"]
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    styles = {"cosine": dict(color="black", lw=2.0), "increase_batch_cosine, G=256": dict(color="tab:red", lw=1.2),
              "increase_batch_cosine, G=32": dict(color="tab:blue", lw=1.0, ls="--")}
    for label, d in data.items():
        legend = f"{label} ({counts[label]:,} updates)"
        axes[0].plot(epochs, d["lr"], label=legend, **styles[label])
        axes[1].plot(epochs, d["B"], **styles[label])
        axes[2].plot(epochs, d["g"], **styles[label])
        ratio = [g / ref if ref > 0 else float("nan") for g, ref in zip(d["g"], reference)]
        axes[3].plot(epochs, ratio, **styles[label])
    axes[0].set(ylabel="lr", title="learning rate")
    axes[1].set(ylabel="global batch B", yscale="log", title=f"global batch (cap {CAP:,})")
    axes[2].set(ylabel="g = lr N / (B (1 - m))", title="analytic noise scale g")
    axes[3].set(ylabel="g / g of the cosine run", ylim=(0.7, 1.55), title="g against the cosine's, same samples seen")
    for ax in axes:
        ax.axvline(WARMUP_EPOCHS, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("epochs (samples seen / N)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"cosine and its batch-growth twin: N={N:,}, B0={B0}, lr {LR}, m {MOMENTUM}, "
                 f"{WARMUP_EPOCHS:g} warmup epochs, {EPOCHS:g} epochs")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "schedule" / "cosine_twin.png")
    args = p.parse_args(argv)
    counts = {label: update_count(schedule(*run)) for label, run in RUNS.items()}
    for label, steps in counts.items():
        print(f"{label:30s} {steps:>9,} updates  ({steps / counts['cosine']:.4f} of the cosine's)")
    print(f"{'analytic, no rounding':30s} {analytic_ratio() * counts['cosine']:>11,.0f}  ({analytic_ratio():.4f})")
    plot(args.out, counts)
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
