"""Is a Lookahead run's test accuracy an artefact of how it is evaluated?

The trainer evaluates Lookahead's slow weights with the batch-norm running statistics that the fast
weights gathered. If the two disagree, the reported accuracy would understate the model. This script
loads the last checkpoint of finished runs and measures the test accuracy four ways: fast or slow
weights, with the stored BN statistics or with statistics recomputed over ``--batches`` training
micro-batches (a cumulative average, in train mode, no gradient). A run without Lookahead gets the
two fast-weight rows, as a control of the recomputation itself.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/check_lookahead_eval.py runs/study_fashion_mnist/decay_lr-radam_lookahead/seed*
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_train.checkpoint import load_tensor_file  # noqa: E402
from dist_train.config import load_config  # noqa: E402
from dist_train.cpu import apply_memory_format  # noqa: E402
from dist_train.data import loader  # noqa: E402
from dist_train.data.shards import read_manifest  # noqa: E402
from dist_train.models import build_model  # noqa: E402
from dist_train.optim.factory import build_optimizer  # noqa: E402
from dist_train.optim.lookahead import SLOW_KEY  # noqa: E402
from dist_train.trainer import Normalise  # noqa: E402


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, manifest: dict, cfg, normalise: Normalise) -> float:
    model.eval()
    hits = seen = 0
    for batch in loader.eval_batches(manifest, cfg.data, micro_batch_size=500, rank=0, world_size=1):
        hits += (model(normalise(batch["image"])).argmax(dim=1) == batch["label"]).sum().item()
        seen += batch["label"].numel()
    return hits / seen


@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, manifest: dict, cfg, normalise: Normalise, batches: int) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over all the batches below
    model.train()
    stream = iter(loader.TrainStream(manifest, cfg.data, micro_batch_size=cfg.train.micro_batch_size,
                                     rank=0, world_size=1, seed=12345))
    for _ in range(batches):
        model(normalise(next(stream)["image"]))


def check(run_dir: Path, batches: int) -> dict[str, float]:
    cfg = load_config(str(run_dir / "config.yaml"), [])
    manifest = read_manifest(cfg.data.shards)
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*/backend.pt"))[-1]
    state = load_tensor_file(checkpoint)
    mean, std = loader.NORMALISATION[manifest["dataset"]]
    normalise = Normalise(mean, std, device=torch.device("cpu"), channels_last=cfg.model.channels_last)
    has_slow = any(SLOW_KEY in s for s in state["optimizer"]["state"].values())
    out = {"step": float(checkpoint.parent.name.split("-")[1])}
    for slow in (False, True) if has_slow else (False,):
        model = build_model(cfg.model.name, num_classes=len(manifest["classes"]),
                            in_channels=manifest["image"]["channels"], width=cfg.model.width)
        apply_memory_format(model, channels_last=cfg.model.channels_last, device=torch.device("cpu"))
        model.load_state_dict(state["model"])
        # The optimizer maps its state to the parameters; its slow_weights() swaps the slow ones in.
        optimizer = build_optimizer(model, cfg.optim)
        optimizer.load_state_dict(state["optimizer"])
        name = "slow" if slow else "fast"
        with optimizer.slow_weights() if slow else contextlib.nullcontext():
            out[f"{name}, stored BN"] = test_accuracy(model, manifest, cfg, normalise)
            recompute_bn_stats(model, manifest, cfg, normalise, batches)
            out[f"{name}, recomputed BN"] = test_accuracy(model, manifest, cfg, normalise)
    out["relative distance fast-slow"] = _relative_distance(optimizer) if has_slow else 0.0
    return out


@torch.no_grad()
def _relative_distance(optimizer: torch.optim.Optimizer) -> float:
    """|theta - phi| / |phi| over all parameters: how far the fast weights are from the slow ones."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    diff = sum(float((p - optimizer.state[p][SLOW_KEY]).square().sum()) for p in params)
    norm = sum(float(optimizer.state[p][SLOW_KEY].square().sum()) for p in params)
    return (diff / norm) ** 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="finished run directories (config.yaml, checkpoints/)")
    p.add_argument("--batches", type=int, default=200, help="training micro-batches for the recomputed BN statistics")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for run_dir in args.run_dirs:
        result = check(run_dir, args.batches)
        cells = ", ".join(f"{k} {100 * v:.2f}%" for k, v in result.items() if k != "step")
        print(f"{run_dir} (step {result['step']:.0f}): {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
