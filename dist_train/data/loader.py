"""Readers of the WebDataset shards written by ``dist-train make-shards``.

Training: an endless, resampled stream of fixed-size micro-batches. Every rank
reads its own slice of the shard list (the split across nodes) and each worker
samples shards with replacement from that slice with its own seed (the split
across workers), so the stream never ends and every rank can pull exactly the
number of micro-batches a step needs. That is what keeps DDP from hanging when
shards are uneven or the global batch changes at run time: the trainer, not the
data, decides how many micro-batches make a step.

Evaluation: a finite pass in which the test shards are split across ranks and
workers without resampling, so every test sample is counted exactly once.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds

from dist_train.config import DataConfig
from dist_train.data.errors import BadSample
from dist_train.distributed import rank_seed

# Per-channel mean/std of pixel values in [0, 1], used to normalise on the device.
NORMALISATION = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class Split:
    """One split of a shard set: the shard paths and how many samples they hold."""

    urls: tuple[str, ...]
    num_samples: int


def split_of(manifest: dict[str, Any], cfg: DataConfig, name: str) -> Split:
    """The shard URLs of split ``name``: beside the manifest, or through ``cfg.shard_url`` (http, pipe:)."""
    splits = manifest["splits"]
    if name not in splits:
        raise ValueError(f"the shards in {cfg.shards!r} have no '{name}' split (they have {sorted(splits)}); "
                         f"re-run dist-train make-shards")
    entry = splits[name]
    names = [s["name"] for s in entry["shards"]]
    if cfg.shard_url:  # remote: webdataset's gopen opens http(s):// and pipe: URLs itself
        return Split(urls=tuple(cfg.shard_url.format(name=n) for n in names), num_samples=int(entry["num_samples"]))
    urls = tuple(str(Path(cfg.shards) / n) for n in names)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}; "
                                f"re-run dist-train make-shards to rewrite them")
    return Split(urls=urls, num_samples=int(entry["num_samples"]))


def _decode_png(data: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img)
    except Exception as err:  # any decoder failure is a bad sample, not a crash
        raise BadSample(f"undecodable PNG: {err}") from err
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def image_decoder(manifest: dict[str, Any], *, train: bool, image_size: int) -> tuple[str, Callable[[bytes], torch.Tensor]]:
    """The sample key holding the image, and a function from its bytes to a uint8 CHW tensor."""
    encoding = manifest["image"]["encoding"]
    if encoding == "png":
        return "png", _decode_png
    if encoding == "jpeg":
        from dist_train.data import jpeg

        size = image_size or 224
        return "jpg", jpeg.train_decoder(size) if train else jpeg.eval_decoder(size, resize=round(size * 256 / 224))
    raise ValueError(f"unknown image encoding {encoding!r} in the manifest; re-run dist-train make-shards")


class _Decode:
    """Sample dict -> (image, label, bad samples dropped just before it). Bad samples never raise."""

    def __init__(self, key: str, decode: Callable[[bytes], torch.Tensor]):
        self.key, self.decode = key, decode

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int, int]]:
        bad = 0
        for sample in samples:
            try:
                image = self.decode(sample[self.key])
                label = int(sample["cls"])
            except (BadSample, KeyError, ValueError):
                bad += 1
                continue
            yield image, label, bad
            bad = 0


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> dict[str, torch.Tensor]:
    images, labels, bad = zip(*items)
    return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
            "bad_samples": torch.tensor(sum(bad), dtype=torch.long)}


def train_batches(manifest: dict[str, Any], cfg: DataConfig, *, micro_batch_size: int,
                  rank: int, world_size: int, seed: int) -> torch.utils.data.DataLoader:
    """An endless loader of training micro-batches for this rank (uint8 images, int64 labels)."""
    split = split_of(manifest, cfg, "train")
    if len(split.urls) < world_size:
        raise ValueError(f"{len(split.urls)} training shards cannot be split over {world_size} ranks; "
                         f"re-run dist-train make-shards with smaller shards (at least ranks x workers)")
    my_urls = list(split.urls[rank::world_size])
    key, decode = image_decoder(manifest, train=True, image_size=cfg.image_size)
    stages: list[Any] = [
        # deterministic=True seeds each worker from (seed, rank, worker id), so a run is reproducible.
        wds.ResampledShards(my_urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
    ]
    if cfg.shuffle_buffer:
        stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer // 2, seed=rank_seed(seed, rank)))
    stages += [_Decode(key, decode), wds.batched(micro_batch_size, collation_fn=_collate, partial=False)]
    pipeline = wds.DataPipeline(*stages)
    return _loader(pipeline, cfg.num_workers, seed=rank_seed(seed, rank))


def eval_batches(manifest: dict[str, Any], cfg: DataConfig, *, micro_batch_size: int,
                 rank: int, world_size: int, split: str = "test") -> torch.utils.data.DataLoader:
    """One pass over this rank's share of the evaluation split; all ranks together see each sample once."""
    if split not in manifest["splits"] and split == "test" and "val" in manifest["splits"]:
        split = "val"
    urls = list(split_of(manifest, cfg, split).urls[rank::world_size])
    key, decode = image_decoder(manifest, train=False, image_size=cfg.image_size)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        _Decode(key, decode),
        wds.batched(micro_batch_size, collation_fn=_collate, partial=True),
    )
    # A rank with fewer shards than workers would leave workers idle; never start more than it has.
    return _loader(pipeline, min(cfg.num_workers, len(urls)), seed=0)


def _loader(pipeline: wds.DataPipeline, num_workers: int, *, seed: int) -> torch.utils.data.DataLoader:
    # Its own generator: worker seeds must not depend on the global RNG's state when the stream is
    # (re)created, or a resumed run would draw different augmentations than the uninterrupted one.
    return torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=False, worker_init_fn=functools.partial(_worker_init, parent_pid=os.getpid()),
        generator=torch.Generator().manual_seed(seed),
    )


def _worker_init(worker_id: int, *, parent_pid: int) -> None:
    import signal

    torch.set_num_threads(1)
    # Preemption signals are for the training process; SLURM signals every process of a job step,
    # and a worker acting on SIGUSR2 (submitit's requeue signal) would requeue the job itself.
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when its rank (``parent_pid``) dies. A rank killed outright (OOM killer,
    torchrun tearing a group down) cannot stop its workers, and since they ignore SIGTERM above, an orphan
    would live on and hold the rank's stdout, stderr and memory.

    The kernel sends the signal only for a death after the ``prctl``: a rank killed while this worker was
    still starting (seen in CI, on a loaded machine) has already left, and the worker has a new parent.
    So the parent is checked once more after the ``prctl``, as prctl(2) advises."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)
