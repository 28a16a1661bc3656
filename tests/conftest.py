"""Shared fixtures: environment for every test, and small real Fashion-MNIST shard sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every rank shares two cores; no telemetry (no network); DeepSpeed on its CPU accelerator.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
# Fixture modules; a test names a fixture as an argument and pytest finds it here (no import needed).
pytest_plugins = ["fixtures_data", "infra.mlflow_server", "infra.slurm_cluster"]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# torch.compile's generated kernels: compiled once per checkout, not once per test process (nor in ~/.cache).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_fmnist_subset(out: Path, *, n_train: int, n_test: int, samples_per_shard: int, seed: int = 0) -> dict:
    """Real Fashion-MNIST images (the first n of each split) written as shards."""
    from dist_train.data import fashion_mnist as fm
    from dist_train.data.shards import SplitSource, write_shards

    idx_dir = fm.find_idx_dir()
    splits = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = fm.load_idx_split(idx_dir, prefix)
        splits[split] = SplitSource(keys=[f"{split}_{i:05d}" for i in range(n)], labels=labels[:n].tolist(),
                                    payloads=list(images[:n]), encode_image=fm.png_bytes, image_key="png")
    return write_shards(out, dataset="fashion_mnist", classes=fm.CLASSES,
                        image={"encoding": "png", "channels": 1, "height": 28, "width": 28}, splits=splits,
                        samples_per_shard=samples_per_shard, seed=seed, progress=False)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """1,003 training images in 5 shards (3 for rank 0, 2 for rank 1 of 2), 300 test images in 2 shards."""
    out = tmp_path_factory.mktemp("fmnist_small")
    write_fmnist_subset(out, n_train=1003, n_test=300, samples_per_shard=220)
    return out
