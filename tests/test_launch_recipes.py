"""The launch recipes in launch/: each one's command passes the config check at its world size (DRY_RUN=1).

A dry run loads the config, checks it against the world size the script asks for and prints the plan,
so a recipe whose batch does not divide over its ranks fails here, not after hours in a queue.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    dist_train = Path(sys.executable).with_name("dist-train")
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DRY_RUN": "1", "DIST_TRAIN": str(dist_train), **env})


@pytest.mark.parametrize("nodes, ranks, micro", [("1", 8, 256), ("4", 32, 256), ("32", 256, 32)])
@pytest.mark.parametrize("recipe", ["goyal_sgd_b8192.yaml", "radam_lookahead_b8192.yaml"])
def test_imagenet_recipes_divide_on_1_4_and_32_nodes(nodes, ranks, micro, recipe):
    proc = _dry_run("imagenet_slurm.sh", str(REPO / "configs" / "imagenet" / recipe), NODES=nodes)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith(f"{ranks} ranks: ") and f"train.micro_batch_size={micro}" in line


def test_the_32_node_layout_is_needed_a_micro_batch_of_256_does_not_divide():
    proc = _dry_run("imagenet_slurm.sh", str(REPO / "configs" / "imagenet" / "goyal_sgd_b8192.yaml"),
                    "train.micro_batch_size=256", NODES="32")
    assert proc.returncode == 2 and proc.stderr.startswith("dist-train: config error: ") and "256 x 256" in proc.stderr


def test_an_unplanned_node_count_is_refused():
    proc = _dry_run("imagenet_slurm.sh", NODES="3")
    assert proc.returncode == 2 and "1, 4 or 32 nodes" in proc.stderr


def test_the_sweep_is_one_job_per_grid_point():
    proc = _dry_run("sweep_slurm.sh")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 9 and all(line.startswith("2 ranks: ") for line in lines)
    assert len({line.split("train.run_dir=")[1].split()[0] for line in lines}) == 9  # each its own run_dir


def test_torchrun_multinode_builds_a_rendezvous_command():
    proc = _dry_run("torchrun_multinode.sh", str(REPO / "configs" / "demo.yaml"), HOST0="10.1.0.1", NNODES="2",
                    NPROC="1")
    assert proc.returncode == 0, proc.stderr
    assert "--nnodes=2" in proc.stdout and "--rdzv-endpoint=10.1.0.1:29400" in proc.stdout
    bad = _dry_run("torchrun_multinode.sh", str(REPO / "configs" / "demo.yaml"), HOST0="10.1.0.1", NNODES="2",
                   NPROC="8")  # 16 ranks x micro 64 = 1024 does not divide the demo's B=128
    assert bad.returncode == 2 and bad.stderr.startswith("dist-train: config error: ")
