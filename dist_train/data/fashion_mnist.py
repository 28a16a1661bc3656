"""Fashion-MNIST as WebDataset shards of greyscale PNGs.

The idx files come from the Debian package ``dataset-fashion-mnist`` (no network needed), from a
``source`` directory, or, as a last resort, from torchvision's downloader.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np

from dist_train.data.shards import SplitSource, write_shards

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {  # our split name -> idx file prefix
    "train": "train",
    "test": "t10k",
}
IMAGE_SIZE = 28
DEFAULT_SAMPLES_PER_SHARD = 5000
# 2 ranks x 2 workers x 2: every loader worker gets at least two shards, in both splits.
MIN_SHARDS_PER_SPLIT = 8


def write_fashion_mnist_shards(
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    seed: int = 0,
    source: str | os.PathLike | None = None,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write the train (60,000) and test (10,000) splits to ``out_dir``; return the manifest."""
    idx_dir = find_idx_dir(source)
    splits = {split: _split_source(idx_dir, prefix) for split, prefix in SPLIT_FILES.items()}
    return write_shards(
        out_dir, dataset="fashion_mnist", classes=CLASSES,
        image={"encoding": "png", "channels": 1, "height": IMAGE_SIZE, "width": IMAGE_SIZE},
        splits=splits, samples_per_shard=samples_per_shard, seed=seed,
        min_shards=MIN_SHARDS_PER_SPLIT, num_workers=num_workers, progress=progress,
    )


def find_idx_dir(source: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the four idx files: ``source``, the Debian package, or a download."""
    if source is not None:
        path = Path(source)
        if not _has_idx_files(path):
            raise FileNotFoundError(
                f"{path} does not hold the Fashion-MNIST idx files "
                f"({', '.join(_idx_names('train'))}, ... optionally .gz)")
        return path
    if _has_idx_files(DEBIAN_DIR):
        return DEBIAN_DIR
    return _download(Path(cache_dir) if cache_dir else _default_cache_dir())


def load_idx_split(idx_dir: str | os.PathLike, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one idx split (``train`` or ``t10k``)."""
    image_name, label_name = _idx_names(prefix)
    images = _read_idx(_find(Path(idx_dir), image_name))
    labels = _read_idx(_find(Path(idx_dir), label_name)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{idx_dir}: idx shapes {images.shape} and {labels.shape} do not match")
    return images, labels


def png_bytes(image: np.ndarray) -> bytes:
    """Encode one greyscale image as PNG (module-level so worker processes can use it)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _split_source(idx_dir: Path, prefix: str) -> SplitSource:
    images, labels = load_idx_split(idx_dir, prefix)
    split = "train" if prefix == "train" else "test"
    return SplitSource(
        keys=[f"{split}_{i:05d}" for i in range(len(labels))], labels=labels.tolist(),
        payloads=list(images), encode_image=png_bytes, image_key="png",
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file: magic (0, 0, dtype code, ndim), big-endian dims, then the data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {tuple(dims)}, got {data.size}")
    return data.reshape(dims)


def _idx_names(prefix: str) -> tuple[str, str]:
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find(directory: Path, name: str) -> Path:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory} has neither {name}.gz nor {name}")


def _has_idx_files(directory: Path) -> bool:
    names = [n for prefix in SPLIT_FILES.values() for n in _idx_names(prefix)]
    return all((directory / f"{n}.gz").is_file() or (directory / n).is_file() for n in names)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dist_train" / "fashion_mnist"


def _download(cache_dir: Path) -> Path:
    raw_dir = cache_dir / "FashionMNIST" / "raw"
    if _has_idx_files(raw_dir):
        return raw_dir
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(cache_dir), train=True, download=True)
        FashionMNIST(root=str(cache_dir), train=False, download=True)
    except Exception as exc:  # offline, proxy, mirror down: all end the same way for the user
        raise RuntimeError(
            f"Fashion-MNIST not found in {DEBIAN_DIR} and the download into {cache_dir} failed "
            f"({exc}). Install it with `apt-get install dataset-fashion-mnist`, or pass "
            f"--source DIR with the four idx files.") from exc
    if not _has_idx_files(raw_dir):
        raise RuntimeError(f"torchvision downloaded Fashion-MNIST but {raw_dir} lacks the idx files")
    return raw_dir
