"""``make demo``: real Fashion-MNIST to shards, then 2 CPU ranks under torchrun, tracked in MLflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
SHARDS = Path("data/shards/fashion_mnist")
RUN_DIR = Path("runs/demo")


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    from dist_train.data.fashion_mnist import write_fashion_mnist_shards
    from dist_train.launch.local import torchrun_command

    print(f"[demo] writing Fashion-MNIST to WebDataset shards in {SHARDS} (finished shards are kept)", flush=True)
    write_fashion_mnist_shards(SHARDS)
    # A fresh run each time: the demo shows training from scratch, not a resume.
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = torchrun_command(str(CONFIG), overrides, nproc_per_node=2)
    print("[demo] " + " ".join(cmd), flush=True)
    tic = time.time()
    subprocess.run(cmd, env=env, check=True)
    summary = json.loads((RUN_DIR / "summary.json").read_text())
    mlflow = Path(sys.executable).with_name("mlflow")
    print(f"\n[demo] trained for {summary['epoch']:.2f} epochs, {summary['step']} optimizer steps, "
          f"in {time.time() - tic:.0f} s on 2 CPU ranks")
    print(f"[demo] test accuracy: top-1 {summary['eval/acc1']:.4f}, top-5 {summary['eval/acc5']:.4f} "
          f"on {int(summary['eval/samples'])} test images")
    dist_train = Path(sys.executable).with_name("dist-train")
    run_id = summary.get("mlflow_run_id")
    print(f"[demo] MLflow run {run_id} in ./mlflow.db; to browse it run:\n"
          f"    {mlflow} ui --backend-store-uri sqlite:///mlflow.db --port 5000\n"
          f"  and open {_run_page('http://127.0.0.1:5000', run_id)}")
    print(f"[demo] to plot its test accuracy and its schedule (lr, B, momentum, noise scale, B_simple, loss):\n"
          f"    {dist_train} report --experiment demo --tracking-uri sqlite:///mlflow.db")
    return 0


def _run_page(base: str, run_id: str | None) -> str:
    """The run's page in MLflow 3's model-training view. The UI's GenAI / model-training switch is the browser's
    own setting (default GenAI, which files the run under "Evaluation runs"); ``workflowType`` in the URL sets it."""
    if not run_id:
        return base
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(tracking_uri="sqlite:///mlflow.db").get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


if __name__ == "__main__":
    sys.exit(main())
