"""The seed study: Smith et al.'s CIFAR protocol scaled down to Fashion-MNIST on a 2-core CPU.

Smith, Kindermans, Ying, Le (ICLR 2018) train from B=128, lr 0.1, m 0.9 and let the noise scale fall
by a factor 5 at three milestones, by decaying the lr (decay_lr), by growing the batch 128 -> 640 ->
3200 -> 16000 (increase_batch), or by growing it once and then decaying the lr (hybrid). Here the
same three schedules run with momentum SGD, with RAdam and with Lookahead(RAdam), plus one adaptive
run whose batch follows the measured noise scale instead of the milestones: 10 settings x 3 seeds,
each a ``dist_train.train.run(...)`` call, all tracked in one MLflow experiment; ``dist_train.report``
then writes the plots and the table to docs/study/. docs/study.md gives the protocol and the budget.

``--part warmup`` runs the second experiment, on the claim that RAdam needs no warmup at a large batch:
SGD, AdamW and RAdam trained at B=3200 from the first step with the lr scaled up from B=128, each
without and with one epoch of linear warmup, RAdam with beta2 0.99, and AdamW and RAdam at the
linearly scaled lr without and with warmup, 3 seeds each; its report goes to docs/study/warmup/.
``--part lookahead_lr`` reruns decay_lr with RAdam and Lookahead(RAdam) at twice the lr, to test why
Lookahead trails RAdam in part 1; its report, in docs/study/lookahead_lr/, includes part 1's runs.

Budget: at most about 2 CPU-hours (7,200 CPU-seconds; 1 hour of wall time on 2 idle cores, 2 runs at a
time with one thread each). Fashion-MNIST keeps its full 60,000 training images, because the largest
batch, 16,000, is already N / 3.75 (Smith's is N / 3.1), and the whole 10,000-image test set (a 0.3%
standard error of the accuracy). The model and the length are chosen to fit:

- model cifar_resnet8, width 8 (20 k parameters): measured 1,390 training images per CPU-second
  (micro-batch 64, channels_last, PNG decoding in the same process, noise scale measured; a shared
  machine, load ~6), about 1,600 on a quiet one; 2.5 CPU-seconds per evaluation of the 10,000 test images;
- 5 epochs, milestones at 1.5, 3 and 4 (Smith's 60, 120, 160 of 200 epochs), an evaluation every half
  epoch and at the end: 10 per run;
- 30 runs x 5 epochs x 60,000 = 9.0 M training images = 6,480 CPU-s at 1,390/s, plus 30 x 10 x 2.5 s =
  740 CPU-s of evaluation and 30 x ~3 s of start-up: about 7,300 CPU-s = 2.0 CPU-hours (1.8 at 1,600/s).
  ``--eval-every-epochs 1`` saves about 370 CPU-s.

Every run uses the same micro-batch, 64, so batch norm sees the same batch in every setting and a growing
batch is accumulated: 128 = 2 x 64, 640 = 10 x 64, 3200 = 50 x 64, 16000 = 250 x 64. Two micro-steps
per step at B=128 also let one process measure the gradient noise scale (McCandlish et al.), which the
adaptive run needs and every run logs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_fashion_mnist.py                 # the study
    .venv/bin/python benchmarks/study_fashion_mnist.py --smoke --shards DIR              # 2 steps per setting

A finished run (its ``summary.json`` exists) is skipped, so an interrupted study continues where it
stopped; a run cut off mid-way resumes from its checkpoint under the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

EXPERIMENT = "study_fashion_mnist"
N_TRAIN = 60_000
EPOCHS = 5.0
MILESTONES_EPOCHS = (1.5, 3.0, 4.0)
START_BATCH = 128
FACTOR = 5
HYBRID_CAP = 640  # Smith's hybrid: grow the batch once (128 -> 640), then decay the lr
MAX_BATCH = 16_000  # 128 x 5^3
MICRO_BATCH = 64
SEEDS = (0, 1, 2)
EVAL_EVERY_EPOCHS = 0.5

COMMON = (
    "model.name=cifar_resnet8", "model.width=8", "model.channels_last=true",
    "data.num_workers=0",  # decode in the training process: exactly one busy core per run
    f"train.global_batch_size={START_BATCH}", f"train.micro_batch_size={MICRO_BATCH}", f"train.epochs={EPOCHS}",
    "train.device=cpu", "train.threads_per_rank=1", "train.progress_bar=false", "train.log_every_steps=10",
    "schedule.noise_scale.enabled=true", "schedule.noise_scale.ema_decay=0.9",  # ~20-step average
    "checkpoint.keep_last=1",
)
RADAM = ("optim.name=radam", "optim.lr=0.003", "optim.weight_decay=0.0001", "optim.decoupled_weight_decay=true")
OPTIMIZERS = {
    # Smith et al.'s CIFAR settings: lr 0.1, m 0.9, weight decay 5e-4 (L2; the config's default).
    "sgd": ("optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.weight_decay=0.0005"),
    # RAdam's official code: betas (0.9, 0.999), weight decay 1e-4 applied decoupled; lr 3e-3 as in configs/demo.yaml.
    "radam": RADAM,
    "radam_lookahead": (*RADAM, "optim.lookahead.k=5", "optim.lookahead.alpha=0.5"),
}
MILESTONES = (f"schedule.milestones_epochs=[{', '.join(map(str, MILESTONES_EPOCHS))}]", f"schedule.factor={FACTOR}")
SCHEDULES = {
    "decay_lr": ("schedule.mode=decay_lr", *MILESTONES),
    "hybrid": ("schedule.mode=hybrid", f"schedule.max_global_batch_size={HYBRID_CAP}", *MILESTONES),
    "increase_batch": ("schedule.mode=increase_batch", *MILESTONES),
}
# The adaptive run climbs the same ladder 128 -> 640 -> 3200 -> 16000, but a step is taken when the
# measured B_simple exceeds the batch, not at a milestone; the lr stays 0.1 (no milestones).
ADAPTIVE = ("schedule.mode=adaptive", f"schedule.max_global_batch_size={MAX_BATCH}",
            f"schedule.adaptive.growth_factor={FACTOR}", "schedule.adaptive.min_steps_between_growths=20")


# --- part 2: warmup at a large batch (the second expectation) ---------------------------
# Every run trains at one large batch from the first step, with the lr scaled up from B=128 by the rule
# its configs/imagenet/ recipe uses: linear for SGD (Goyal et al.), square root for the Adam family. Each
# optimizer runs with and without a linear warmup; AdamW is the control, the optimizer RAdam claims to
# free from warmup. B=3200 is the largest batch of the ladder that still leaves ~90 updates in 5 epochs
# (16,000 would leave 18). The lr falls by 5 at the same milestones as decay_lr.
LARGE_BATCH = 3200
WARMUP_EPOCHS = 1.0  # 19 of 94 updates, from 1/25 of the target lr (B_ref / B, where Goyal et al. start)
ADAMW = ("optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.0001", "optim.decoupled_weight_decay=true")
LARGE_BATCH_OPTIMIZERS = {
    "sgd": (*OPTIMIZERS["sgd"], "schedule.lr_scaling=linear"),  # 0.1 x 3200/128 = 2.5
    "adamw": (*ADAMW, "schedule.lr_scaling=sqrt"),  # 3e-3 x sqrt(25) = 0.015
    "radam": (*RADAM, "schedule.lr_scaling=sqrt"),  # 0.015
}
LARGE_BATCH_COMMON = (f"train.global_batch_size={LARGE_BATCH}", f"schedule.reference_global_batch_size={START_BATCH}",
                      "schedule.mode=decay_lr", *MILESTONES)
WARMUP = ("schedule.warmup_epochs=" + str(WARMUP_EPOCHS), f"schedule.warmup_start_factor={START_BATCH / LARGE_BATCH}")


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: tuple[str, ...]


def settings() -> list[Setting]:
    """The 10 settings: 3 schedules x 3 optimizers, and adaptive batch growth with momentum SGD."""
    out = [Setting(f"{schedule}-{optimizer}", (*s_over, *o_over))
           for schedule, s_over in SCHEDULES.items() for optimizer, o_over in OPTIMIZERS.items()]
    out.append(Setting("adaptive-sgd", (*ADAPTIVE, *OPTIMIZERS["sgd"])))
    return out


# RAdam's rectification is itself a warmup whose length is set by beta2 (r_t ~ 0.2 after 94 steps at
# 0.999, ~0.6 at 0.99): one more setting shortens it, without an lr warmup.
RADAM_SHORT_RECTIFICATION = (*LARGE_BATCH_OPTIMIZERS["radam"], "optim.beta2=0.99")
# At the square-root lr no optimizer may need warmup at all. The Adam family at the linearly scaled lr,
# 3e-3 x 25 = 0.075, is where Adam's first steps are known to be unstable: AdamW and RAdam there, with
# and without warmup.
LINEAR_LR = {name: (*o_over, "schedule.lr_scaling=linear") for name, o_over in
             (("adamw_linear_lr", ADAMW), ("radam_linear_lr", RADAM))}


def warmup_settings() -> list[Setting]:
    """The 11 settings of part 2 at B=3200 from the start: SGD, AdamW and RAdam without and with warmup;
    RAdam with beta2 0.99 without warmup; AdamW and RAdam at the linearly scaled lr without and with warmup."""
    with_and_without = {**LARGE_BATCH_OPTIMIZERS, **LINEAR_LR}
    return [*(Setting(f"b{LARGE_BATCH}-{optimizer}-{'warmup' if warm else 'no_warmup'}",
                      (*LARGE_BATCH_COMMON, *o_over, *(WARMUP if warm else ())))
              for optimizer, o_over in with_and_without.items() for warm in (False, True)),
            Setting(f"b{LARGE_BATCH}-radam_beta2_0.99-no_warmup", (*LARGE_BATCH_COMMON, *RADAM_SHORT_RECTIFICATION))]


# --- part 3: is Lookahead(RAdam) behind RAdam because of the lr? --------------------------------
# In part 1 Lookahead(RAdam) ends ~3% below RAdam at the same lr, 3e-3. With alpha = 0.5 the slow
# weights cover about half the fast weights' distance, so a 5-epoch budget may simply be too short
# at that lr. This part reruns decay_lr with both optimizers at twice the lr; its report sets them
# beside part 1's decay_lr runs at 3e-3.
LR_CHECK = 0.006


def lookahead_lr_settings() -> list[Setting]:
    """decay_lr with RAdam and Lookahead(RAdam) at lr 6e-3 (part 1 ran them at 3e-3)."""
    return [Setting(f"decay_lr-{optimizer}-lr{LR_CHECK}", (*SCHEDULES["decay_lr"], *OPTIMIZERS[optimizer],
                                                           f"optim.lr={LR_CHECK}"))
            for optimizer in ("radam", "radam_lookahead")]


# --- part 4: the cosine decay and its batch-growth twin ------------------------------------------
# schedule.mode=cosine takes the lr along a cosine from 0.1 (SGD) or 3e-3 (RAdam) to 0 over the 5 epochs at
# B=128; increase_batch_cosine keeps the lr and grows B = 128 / c(t) in multiples of the micro-batch, up to
# the ladder's top, 16,000, after which the lr takes over: the same analytic noise scale at every sample.
# Micro-batch 16 in both: the twin's batch moves in steps of the micro-batch, and at 64 (part 1's) its noise
# scale would be up to 64 / (2 x 128) = 25% off the cosine's near the start; at 16, 6%.
COSINE_MICRO_BATCH = 16
COSINE_TWIN = {
    "cosine": ("schedule.mode=cosine", f"train.micro_batch_size={COSINE_MICRO_BATCH}"),
    "increase_batch_cosine": ("schedule.mode=increase_batch_cosine", f"schedule.max_global_batch_size={MAX_BATCH}",
                              f"train.micro_batch_size={COSINE_MICRO_BATCH}"),
}


def cosine_settings() -> list[Setting]:
    """The cosine decay and its twin, with momentum SGD and with RAdam."""
    return [Setting(f"{schedule}-{optimizer}", (*s_over, *OPTIMIZERS[optimizer]))
            for schedule, s_over in COSINE_TWIN.items() for optimizer in ("sgd", "radam")]


# --- part 5: adaptive batch growth with RAdam, raw against preconditioned noise scale -------------
# The adaptive controller grows B by 5 when the measured B_simple exceeds it (part 1's ladder). With RAdam
# the step is P^-1 g, so the noise that matters is P^-1 g's (schedule.noise_scale.preconditioned).
def preconditioned_settings() -> list[Setting]:
    """Adaptive batch growth with RAdam, steered by the raw or by the preconditioned noise scale."""
    return [Setting(f"adaptive-radam-{'preconditioned' if pre else 'raw'}",
                    (*ADAPTIVE, *RADAM, f"schedule.noise_scale.preconditioned={str(pre).lower()}"))
            for pre in (False, True)]


@dataclass(frozen=True)
class Part:
    """One experiment of the study: its settings, MLflow experiment, report grouping and report directory.

    ``compare_with`` names parts whose runs (those matching ``report_filter``) the report sets beside this
    part's own, e.g. part 1's runs at the default lr beside part 3's at twice that lr.
    """
    settings: Callable[[], list[Setting]]
    experiment: str
    group_by: tuple[str, ...]
    out: Path
    compare_with: tuple[str, ...] = ()
    report_filter: str = ""


PARTS = {
    "schedules": Part(settings, EXPERIMENT, ("schedule.mode", "optim.name", "optim.lookahead.k"), REPO / "docs" / "study"),
    "warmup": Part(warmup_settings, f"{EXPERIMENT}_warmup",
                   ("optim.name", "optim.beta2", "schedule.lr_scaling", "schedule.warmup_epochs"),
                   REPO / "docs" / "study" / "warmup"),
    "lookahead_lr": Part(lookahead_lr_settings, f"{EXPERIMENT}_lookahead_lr",
                         ("optim.name", "optim.lookahead.k", "optim.lr"), REPO / "docs" / "study" / "lookahead_lr",
                         compare_with=("schedules",),
                         report_filter="params.`schedule.mode` = 'decay_lr' and params.`optim.name` = 'radam'"),
    "cosine": Part(cosine_settings, f"{EXPERIMENT}_cosine", ("schedule.mode", "optim.name"),
                   REPO / "docs" / "study" / "cosine"),
    "preconditioned": Part(preconditioned_settings, f"{EXPERIMENT}_preconditioned",
                           ("schedule.noise_scale.preconditioned",), REPO / "docs" / "study" / "preconditioned"),
}


def run_overrides(setting: Setting, seed: int, *, shards: str, run_root: Path, tracking_uri: str, experiment: str,
                  eval_every_epochs: float, smoke: bool) -> list[str]:
    """The dotted overrides of one training run."""
    out = [*COMMON, *setting.overrides, f"data.shards={shards}", f"train.seed={seed}",
           f"train.run_dir={run_root / setting.name / f'seed{seed}'}", f"train.eval_every_epochs={eval_every_epochs}",
           f"tracking.tracking_uri={tracking_uri}", f"tracking.experiment={experiment}",
           f"tracking.run_name={setting.name}-seed{seed}"]
    if smoke:  # every code path of the setting, for seconds: 2 steps, a tiny model, one evaluation at the end
        out += ["train.max_steps=2", "model.width=4", "train.eval_every_epochs=0"]
    return out


# --- the batches each schedule asks for ---------------------------------------------------------
def planned_batches(setting: Setting, *, dataset_size: int = N_TRAIN, world_size: int = 1,
                    twin_rounding: bool = False) -> list[int]:
    """Every global batch ``setting`` trains with, checked to need no rounding and to divide into micro-batches.

    Raises ValueError if a batch is not a multiple of micro-batch x world size or had to be rounded (the
    schedule would change the protocol's noise scale). For the adaptive mode, the controller's whole ladder;
    for the cosine modes, each batch in the order a run meets it (the twin's warning about its per-step
    rounding counts as rounding, unless ``twin_rounding``: the cosine part accepts it, bounded by its micro-batch).
    """
    from dist_train.config import accumulation_steps, load_config
    from dist_train.schedule import BatchSizeController, Schedule, optimizer_family
    from dist_train.schedule.config import COSINE_MODES

    cfg = load_config(None, [*COMMON, *setting.overrides])
    granularity = cfg.train.micro_batch_size * world_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rounded milestone batch is an error here, not a warning
        if twin_rounding:
            warnings.filterwarnings("ignore", message="increase_batch_cosine: the global batch is rounded")
        schedule = Schedule(cfg.schedule, base_lr=cfg.optim.lr, base_momentum=cfg.optim.momentum,
                            base_global_batch_size=cfg.train.global_batch_size, dataset_size=dataset_size,
                            optimizer_family=optimizer_family(cfg.optim.name), batch_granularity=granularity,
                            total_epochs=cfg.train.epochs)
    if cfg.schedule.mode == "adaptive":
        controller = BatchSizeController(cfg.schedule.adaptive,
                                         start_global_batch_size=schedule.start_global_batch_size,
                                         max_global_batch_size=cfg.schedule.max_global_batch_size,
                                         batch_granularity=granularity)
        batches = [controller.global_batch_size]
        for growth in range(1, 64):  # a B_simple above any batch grows it at every allowed step, up to the cap
            if not controller.update(step=growth * cfg.schedule.adaptive.min_steps_between_growths, b_simple=1e30):
                break
            batches.append(controller.global_batch_size)
        planned = [round(batches[0] * cfg.schedule.adaptive.growth_factor ** k) for k in range(len(batches))]
        if batches != [min(b, cfg.schedule.max_global_batch_size) for b in planned]:
            raise ValueError(f"{setting.name}: the adaptive ladder {batches} was rounded away from {planned}")
    elif cfg.schedule.mode in COSINE_MODES:  # the twin's batch may move at any step: walk the run
        batches, samples = [], 0
        while samples < cfg.train.epochs * dataset_size:
            batch = schedule.state_at(samples).global_batch_size
            batches += [batch] if not batches or batch != batches[-1] else []
            samples += batch
    else:
        batches = [schedule.state_at(math.ceil(m * dataset_size)).global_batch_size
                   for m in (0.0, *cfg.schedule.milestones_epochs)]
    for batch in batches:
        accumulation_steps(batch, micro_batch_size=cfg.train.micro_batch_size, world_size=world_size)
    return batches


# --- running ------------------------------------------------------------------------------------
def train_command(overrides: Sequence[str]) -> list[str]:
    """``dist-train train`` with ``overrides``, in a fresh interpreter of this Python."""
    return [sys.executable, "-m", "dist_train", "train", *overrides]


def run_all(jobs: list[tuple[str, list[str]]], *, parallel: int) -> list[str]:
    """Train every (name, overrides), ``parallel`` at a time; returns the names that failed.

    Each run is a process of its own (``dist-train train``): a run that dies, even by a signal inside a
    native kernel, fails only its own setting, and every run starts from a clean interpreter (threads,
    RNGs, memory). A process pool would not do: one crashed worker breaks the pool and every run after it.
    """
    import signal
    import subprocess

    # This checkout first on the path, as for the driver itself (sys.path above).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    failed: list[str] = []
    pending = list(jobs)
    running: dict[str, tuple[subprocess.Popen, float, list[str]]] = {}
    while pending or running:
        while pending and len(running) < max(parallel, 1):
            name, overrides = pending.pop(0)
            running[name] = (subprocess.Popen(train_command(overrides), env=env), time.time(), overrides)
        time.sleep(0.2)
        for name, (proc, started, overrides) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            summary_file = Path(_value(overrides, "train.run_dir")) / "summary.json"
            if rc != 0 or not summary_file.is_file():
                how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
                print(f"[study] {name}: FAILED ({how}); its log is above", flush=True)
                failed.append(name)
                continue
            result = json.loads(summary_file.read_text())
            print(f"[study] {name}: test acc1 {result['eval/acc1']:.4f} after {result['step']} updates, "
                  f"{time.time() - started:.0f} s", flush=True)
    return failed


def _ensure_experiment(tracking_uri: str, experiment: str) -> None:
    """Create the experiment once, before parallel runs race to create it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=sorted(PARTS), default="schedules",
                   help="schedules: 3 schedules x 3 optimizers + adaptive (default); "
                        "warmup: SGD, AdamW and RAdam at B=3200 without and with warmup; "
                        "lookahead_lr: RAdam and Lookahead(RAdam) with decay_lr at twice the lr; "
                        "cosine: the cosine decay and its batch-growth twin, SGD and RAdam; "
                        "preconditioned: adaptive growth with RAdam, raw against preconditioned noise scale")
    p.add_argument("--shards", default=str(REPO / "data" / "shards" / "fashion_mnist"),
                   help="Fashion-MNIST shards (`make demo` or `dist-train make-shards fashion-mnist` writes them)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default=None,
                   help=f"MLflow experiment (default: {EXPERIMENT}, or {EXPERIMENT}_smoke)")
    p.add_argument("--run-root", default=None, help="run directories (default: runs/<experiment>)")
    p.add_argument("--out", default=None,
                   help="report directory (default: docs/study, or <run-root>/report with --smoke)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--smoke: 0)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only the settings whose name contains one of these")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, one process and thread each (default: 2; --smoke: 1)")
    p.add_argument("--eval-every-epochs", type=float, default=EVAL_EVERY_EPOCHS)
    p.add_argument("--smoke", action="store_true",
                   help="every setting for 2 steps with a tiny model: checks the plumbing")
    p.add_argument("--log-to-mlflow", action=argparse.BooleanOptionalAction, default=True,
                   help="also log the report's PNGs and table to MLflow, as a run named 'report' (default: yes)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here or in the workers
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = parse_args(argv)
    from dist_train.config import TrackingConfig
    from dist_train.report import make_report, markdown_table
    from dist_train.tracking import resolve_tracking_uri

    part = PARTS[args.part]
    experiment = args.experiment or (f"{part.experiment}_smoke" if args.smoke else part.experiment)
    tracking_uri = args.tracking_uri or resolve_tracking_uri(TrackingConfig())
    run_root = Path(args.run_root or Path("runs") / experiment)
    out = Path(args.out or (run_root / "report" if args.smoke else part.out))
    chosen = [s for s in part.settings() if not args.only or any(word in s.name for word in args.only)]
    for setting in chosen:  # before anything trains: a schedule that cannot run is an error now
        batches = planned_batches(setting, twin_rounding=True)
        shown = batches if len(batches) <= 8 else [*batches[:4], "...", *batches[-2:]]
        print(f"[study] {setting.name}: {len(batches)} global batch sizes {shown}", flush=True)
    jobs = [(f"{s.name}-seed{seed}", run_overrides(s, seed, shards=args.shards, run_root=run_root,
                                                   tracking_uri=tracking_uri, experiment=experiment,
                                                   eval_every_epochs=args.eval_every_epochs, smoke=args.smoke))
            for seed in (args.seeds or ((0,) if args.smoke else SEEDS)) for s in chosen]
    finished = [name for name, o in jobs if (Path(_value(o, "train.run_dir")) / "summary.json").is_file()]
    if finished:
        print(f"[study] {len(finished)} runs already finished, skipped: {', '.join(finished)}", flush=True)
    todo = [(name, o) for name, o in jobs if name not in finished]
    _ensure_experiment(tracking_uri, experiment)
    started = time.time()
    failed = run_all(todo, parallel=args.jobs or (1 if args.smoke else 2))
    print(f"[study] {len(todo) - len(failed)} of {len(todo)} runs trained in {time.time() - started:.0f} s", flush=True)
    # The parts this one is compared with, by their default experiments (the _smoke ones with --smoke).
    others = [PARTS[name].experiment + ("_smoke" if args.smoke else "") for name in part.compare_with]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    missing = [name for name in others if client.get_experiment_by_name(name) is None]
    if missing:
        print(f"[study] the report leaves out {missing}: not run yet", flush=True)
    report = make_report(experiments=[experiment, *(e for e in others if e not in missing)], out_dir=out,
                         tracking_uri=tracking_uri, group_by=part.group_by, filter_string=part.report_filter,
                         log_to_mlflow=args.log_to_mlflow)
    print(markdown_table(report.groups, group_by=report.group_by), end="")
    print(f"[study] report: {', '.join(str(p) for p in report.files)}")
    return 1 if failed else 0


def _value(overrides: Sequence[str], key: str) -> str:
    """The value of the last override of ``key``."""
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


if __name__ == "__main__":
    sys.exit(main())
