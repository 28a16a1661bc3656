"""Time from process start to the first resumed step: early in the run against several epochs in.

    OMP_NUM_THREADS=1 python benchmarks/bench_resume.py [--baseline-checkout DIR] [--images 1000]
                                                         [--late-epochs 4] [--repeats 3]

On JPEG shards of synthetic ImageNet-sized images (bench_decode.synthetic_jpegs: ~400x376, ~110 KB), one
process trains to a step, checkpoints, and exits; then ``dist-train train`` resumes it and runs one more step,
and the wall time of that second process (start-up, resume, one step, the final tiny evaluation and
checkpoint) is what is measured. Early: a checkpoint at step 2. Late: one ``--late-epochs`` epochs in. Every
repeat resumes a fresh copy of the same checkpoint, alternating early and late.

``--baseline-checkout DIR`` runs the same measurement with another checkout of dist_train side by side, in the
same run (``git worktree add /tmp/replay fa9f412`` gives the loader that replays the stream on resume).
Results print as a markdown table for docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import synthetic_jpegs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MICRO, GLOBAL = 16, 32


def make_shards(root: Path, images: int) -> Path:
    from dist_train.data.imagenet import write_imagenet_shards

    src = root / "imagenet"
    for split, count, seed in (("train", images, 0), ("val", 16, 1)):
        for i, data in enumerate(synthetic_jpegs(count, seed=seed)):
            folder = src / split / f"n{i % 10:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{i:06d}.JPEG").write_bytes(data)
    out = root / "shards"
    write_imagenet_shards(src, out, samples_per_shard=100, num_workers=2, progress=False)
    return out


def write_config(root: Path, shards: Path) -> Path:
    config = root / "bench.yaml"
    config.write_text(f"""\
data: {{shards: {shards}, num_workers: 2, image_size: 64}}
model: {{name: resnet18}}
optim: {{name: sgd, lr: 0.01, momentum: 0.9}}
train: {{global_batch_size: {GLOBAL}, micro_batch_size: {MICRO}, epochs: 100, eval_every_epochs: 0,
         log_every_steps: 1000, progress_bar: false, precision: fp32}}
checkpoint: {{keep_last: 1}}
tracking: {{enabled: false}}
""")
    return config


def train(checkout: Path, config: Path, run_dir: Path, max_steps: int) -> float:
    """Run ``dist-train train`` from ``checkout`` to ``max_steps``; return its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dist_train", "train", str(config), f"train.run_dir={run_dir}",
                           f"train.max_steps={max_steps}"], cwd=checkout, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - tic
    if proc.returncode != 0:
        raise RuntimeError(f"training from {checkout} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def imported_from(checkout: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.run([sys.executable, "-c", "import dist_train; print(dist_train.__file__)"], cwd=checkout,
                          env=env, capture_output=True, text=True, check=True).stdout.strip()


def measure(checkout: Path, config: Path, root: Path, steps: dict[str, int], repeats: int) -> dict[str, list[float]]:
    prepared = {}
    for name, step in steps.items():
        prepared[name] = root / f"prepared-{name}"
        train(checkout, config, prepared[name], step)  # ends with a checkpoint at `step`
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            run_dir = root / f"resume-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(prepared[name], run_dir)
            times[name].append(train(checkout, config, run_dir, step + 1))
    return times


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-checkout", type=Path, help="another dist_train checkout to measure beside this one")
    parser.add_argument("--images", type=int, default=1000, help="training images (synthetic JPEGs)")
    parser.add_argument("--late-epochs", type=int, default=4, help="epochs before the late checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    checkouts = {"this checkout": REPO}
    if args.baseline_checkout:
        checkouts["baseline"] = args.baseline_checkout.resolve()
    steps = {"early": 2, "late": args.late_epochs * args.images // GLOBAL}
    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
        root = Path(tmp)
        config = write_config(root, make_shards(root, args.images))
        results = {}
        for label, checkout in checkouts.items():
            print(f"# {label}: dist_train from {imported_from(checkout)}", flush=True)
            results[label] = measure(checkout, config, root / label.replace(" ", "_"), steps, args.repeats)
            print(f"#   {results[label]}", flush=True)
    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} CPUs; {args.images} training "
          f"JPEGs, micro-batch {MICRO}, global batch {GLOBAL}, 2 loader workers; medians of {args.repeats}.\n")
    print(f"| code | resume at step {steps['early']} (s) | resume at step {steps['late']}, epoch "
          f"{steps['late'] * GLOBAL / args.images:.1f} (s) | late / early |")
    print("|---|---:|---:|---:|")
    for label, times in results.items():
        early, late = statistics.median(times["early"]), statistics.median(times["late"])
        print(f"| {label} | {early:.1f} | {late:.1f} | {late / early:.2f}x |")


if __name__ == "__main__":
    main()
