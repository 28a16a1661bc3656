"""Readers of the WebDataset shards written by ``dist-train make-shards``.

Training (``TrainStream``): an endless stream of fixed-size micro-batches per rank, in true epochs: each
epoch is a fresh seeded permutation of the training set, dealt to ranks and workers without replacement
(``dist_train/data/order.py``). Every rank draws as many micro-batches as the trainer asks for, so DDP never
hangs on uneven shards and the global batch can change mid-epoch. The stream is a ``Stateful``: its position
is a few integers, and a resumed stream starts there at the cost of skipping, without decoding, to an offset
inside the shards in flight. Augmentation draws from a generator seeded by (seed, epoch, position), so a
sample is cropped (and RandAugment-ed, erased) the same way whichever worker, rank or restart decodes it. With
repeated augmentation, a copy is a position of its own, and so gets augmentations of its own.

Evaluation (``eval_batches``): one pass in which the evaluation split, in manifest order, is cut into equal
contiguous ranges per rank and worker, so every sample is counted exactly once for any number of ranks and
workers, more ranks than shards included.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from dist_train.config import DataConfig
from dist_train.data.augment import Augment, build_augment
from dist_train.data.errors import BadSample
from dist_train.data.order import Deal, EpochOrder, Lane, StreamPosition, advanced, redeal, stream_ranges, unread
from dist_train.data.reader import ShardReader

log = logging.getLogger(__name__)

# Per-channel mean/std of pixel values in [0, 1], used to normalise on the device.
NORMALISATION = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
STATE_VERSION = 1


@dataclass(frozen=True)
class Split:
    """One split of a shard set: where its shards are read from, their names and sample counts."""

    urls: tuple[str, ...]
    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @property
    def starts(self) -> np.ndarray:
        """Dataset index of each shard's first sample."""
        return np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)[:-1]])


def split_of(manifest: dict[str, Any], cfg: DataConfig, name: str) -> Split:
    """The shards of split ``name``: beside the manifest, or through ``cfg.shard_url`` (http, pipe:)."""
    splits = manifest["splits"]
    if name not in splits:
        raise ValueError(f"the shards in {cfg.shards!r} have no '{name}' split (they have {sorted(splits)}); "
                         f"re-run dist-train make-shards")
    shards = splits[name]["shards"]
    names = tuple(s["name"] for s in shards)
    if cfg.shard_url:  # remote: webdataset's gopen opens http(s):// and pipe: URLs itself
        urls = tuple(cfg.shard_url.format(name=n) for n in names)
    else:
        urls = tuple(str(Path(cfg.shards) / n) for n in names)
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}; "
                                    f"re-run dist-train make-shards to rewrite them")
    return Split(urls=urls, names=names, sizes=tuple(int(s["num_samples"]) for s in shards))


def _decode_png(data: bytes, rng: random.Random | None = None) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img)
    except Exception as err:  # any decoder failure is a bad sample, not a crash
        raise BadSample(f"undecodable PNG: {err}") from err
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


Decode = Callable[..., torch.Tensor]
"""``decode(image_bytes, rng)``: a uint8 CHW tensor; ``rng`` drives the sample's augmentation."""


def image_decoder(manifest: dict[str, Any], *, train: bool, image_size: int,
                  augment: Augment | None = None, eval_image_size: int = 0,
                  eval_resize: int = 0) -> tuple[str, Decode]:
    """The sample key holding the image, and a function from its bytes (and a generator) to a uint8 CHW tensor;
    ``augment`` (JPEG training only) runs after the crop and flip."""
    encoding = manifest["image"]["encoding"]
    if encoding == "png":
        assert augment is None, "train_augment refuses augmentation of PNG shards"
        return "png", _decode_png
    if encoding == "jpeg":
        from dist_train.data import jpeg

        if train:
            return "jpg", jpeg.train_decoder(image_size or 224, augment=augment)
        crop = eval_image_size or image_size or 224
        return "jpg", jpeg.eval_decoder(crop, resize=eval_resize or round(crop * 256 / 224))
    raise ValueError(f"unknown image encoding {encoding!r} in the manifest; re-run dist-train make-shards")


def train_augment(manifest: dict[str, Any], cfg: DataConfig) -> Augment | None:
    """The augmentation after the crop and flip that ``cfg`` asks for; an error for PNG shards, whose pipeline
    has no random augmentation at all (Fashion-MNIST), so repeats of a sample would be identical."""
    asked = [f"data.{name}={getattr(cfg, name)}" for name, off in
             (("auto_augment", "none"), ("random_erasing", 0.0), ("repeated_augmentation", 1)) if getattr(cfg, name) != off]
    if asked and manifest["image"]["encoding"] != "jpeg":
        raise ValueError(f"{', '.join(asked)} need JPEG shards (ImageNet); the shards in {cfg.shards!r} hold "
                         f"{manifest['image']['encoding']} images ({manifest['dataset']}), decoded without random "
                         f"augmentation; remove these settings")
    mean = NORMALISATION.get(manifest["dataset"], ((0.5,) * manifest["image"]["channels"],))[0]
    return build_augment(cfg.auto_augment, num_ops=cfg.randaugment_num_ops, magnitude=cfg.randaugment_magnitude,
                         random_erasing=cfg.random_erasing, mean=mean)


def _sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The augmentation generator of the sample at ``position`` of ``epoch``'s order: the same wherever and
    whenever it is decoded."""
    return random.Random(f"{seed}/{epoch}/{position}")


class _MicroBatcher:
    """Decoded samples -> fixed-size micro-batches. A sample that fails to decode is counted and its slot
    filled with a good sample of the same micro-batch (else the last good one this worker made): the
    micro-batch keeps its size and the data position its arithmetic."""

    def __init__(self, key: str, decode: Decode, micro: int):
        self.key, self.decode, self.micro = key, decode, micro
        self._items: list[tuple[torch.Tensor, int, int] | None] = []  # (image, label, index); None: bad
        self._last_good: tuple[torch.Tensor, int, int] | None = None

    def add(self, sample: dict[str, bytes], index: int, rng: random.Random | None) -> dict[str, torch.Tensor] | None:
        try:
            self._items.append((self.decode(sample[self.key], rng), int(sample["cls"]), index))
        except (BadSample, KeyError, ValueError):
            self._items.append(None)
        return self._flush() if len(self._items) == self.micro else None

    def _flush(self) -> dict[str, torch.Tensor]:
        items, self._items = self._items, []
        good = [it for it in items if it is not None]
        fill = good or ([self._last_good] if self._last_good is not None else [])
        if not fill:
            raise BadSample(f"none of the {len(items)} samples of this worker's first micro-batch could be decoded; "
                            f"check the shards with `dist-train make-shards verify DIR`")
        self._last_good = fill[-1]
        full = [it if it is not None else fill[n % len(fill)] for n, it in enumerate(items)]
        return {"image": torch.stack([it[0] for it in full]),
                "label": torch.tensor([it[1] for it in full], dtype=torch.long),
                "index": torch.tensor([it[2] for it in full], dtype=torch.long),
                "bad_samples": torch.tensor(len(items) - len(good), dtype=torch.long)}


class _TrainWorkerData(torch.utils.data.IterableDataset):
    """What one DataLoader worker of one rank reads: the stream its role in the deal gives it."""

    def __init__(self, split: Split, order: EpochOrder, position: StreamPosition, *, rank: int, key: str,
                 decode: Decode):
        self.split, self.order, self.position, self.rank = split, order, position, rank
        self.key, self.decode = key, decode

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        deal = self.position.deal
        info = torch.utils.data.get_worker_info()
        # The DataLoader starts each new iterator at its worker 0: the worker that takes this rank's next
        # micro-batch is the one whose role comes next in the round robin.
        drawn = self.position.micro_batches // deal.ranks
        role = (drawn + (info.id if info is not None else 0)) % deal.workers
        stream = deal.stream(self.rank, role)
        readers: list[ShardReader] = []  # one per lane, each moving forward through its own shards
        batcher = _MicroBatcher(self.key, self.decode, deal.micro)
        starts = self.split.starts
        try:
            for epoch, lanes in stream_ranges(self.order, self.position, stream):
                readers += [ShardReader(self.split.urls, names=self.split.names)
                            for _ in range(len(lanes) - len(readers))]
                for position, shard, offset, sample in _read_lanes(readers, self.order, epoch, lanes):
                    batch = batcher.add(sample, int(starts[shard] + offset),
                                        _sample_rng(self.order.seed, epoch, position))
                    if batch is not None:
                        yield batch
        finally:
            for reader in readers:
                reader.close()


def _read_lanes(readers: list[ShardReader], order: EpochOrder, epoch: int,
                lanes: tuple[Lane, ...]) -> Iterator[tuple[int, int, int, dict[str, bytes]]]:
    """``_read_order_range`` over each lane's intervals, the lanes in turn (one sample from each per round)."""
    streams = [_read_lane(reader, order, epoch, lane) for reader, lane in zip(readers, lanes)]
    while streams:
        for items in list(streams):
            item = next(items, None)
            if item is None:
                streams.remove(items)
            else:
                yield item


def _read_lane(reader: ShardReader, order: EpochOrder, epoch: int,
               lane: Lane) -> Iterator[tuple[int, int, int, dict[str, bytes]]]:
    for start, stop in lane:
        for first, lo, hi in order.picks(epoch, start, stop):
            for position, shard, offset, sample in _read_order_range(reader, order, epoch, lo, hi):
                yield first + position - lo, shard, offset, sample


def _read_order_range(reader: ShardReader, order: EpochOrder, epoch: int, start: int,
                      stop: int) -> Iterator[tuple[int, int, int, dict[str, bytes]]]:
    """``(position, shard, offset, sample)`` for the permuted samples ``[start, stop)`` of ``epoch``, in order
    (the order positions that draw them, without repeats).

    Each window's samples are read in shard order (forward through each shard) and handed out in the
    window's permuted order: at most one window of encoded samples is held."""
    position = start
    for layout in order.windows(epoch, start, stop):
        shards, offsets = order.locate(epoch, layout)
        by_layout = np.argsort(layout, kind="stable")
        held: dict[int, tuple[int, int, dict[str, bytes]]] = {}
        sorted_shards, sorted_offsets, sorted_layout = shards[by_layout], offsets[by_layout], layout[by_layout]
        cuts = np.flatnonzero(np.diff(sorted_shards)) + 1
        for piece in np.split(np.arange(len(layout)), cuts):
            if len(piece) == 0:
                continue
            shard = int(sorted_shards[piece[0]])
            for n, (offset, sample) in zip(piece, reader.take(shard, sorted_offsets[piece])):
                held[int(sorted_layout[n])] = (shard, offset, sample)
        for lp in layout:
            shard, offset, sample = held.pop(int(lp))
            yield position, shard, offset, sample
            position += 1


class TrainStream:
    """This rank's endless stream of training micro-batches (uint8 images, int64 labels and dataset indices).

    A ``Stateful``: ``state_dict`` is the data position of the whole run (the same on every rank), and after
    ``load_state_dict`` the next iterator starts there. A position saved under another deal (another number
    of ranks or workers per rank) is re-dealt: the rest of its epoch goes to this run's streams.
    """

    def __init__(self, manifest: dict[str, Any], cfg: DataConfig, *, micro_batch_size: int, rank: int,
                 world_size: int, seed: int):
        self.split = split_of(manifest, cfg, "train")
        self.order = EpochOrder(self.split.sizes, seed=seed, window=cfg.shuffle_buffer, resample=cfg.resample,
                                repeats=cfg.repeated_augmentation)
        self.rank, self.num_workers = rank, cfg.num_workers
        self.key, self.decode = image_decoder(manifest, train=True, image_size=cfg.image_size,
                                              augment=train_augment(manifest, cfg))
        self.position = StreamPosition(Deal(ranks=world_size, workers=max(1, cfg.num_workers), micro=micro_batch_size))
        self._generation = 0
        share = self.split.num_samples / self.position.deal.streams
        if rank == 0 and cfg.shuffle_buffer > max(share / 2, 1):
            log.warning("data.shuffle_buffer=%d is more than half of each worker's share of an epoch (%d samples): "
                        "every worker reads up to two windows beyond its share (reading, not decoding); lower it",
                        cfg.shuffle_buffer, share)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generation = self._generation
        data = _TrainWorkerData(self.split, self.order, self.position, rank=self.rank, key=self.key,
                                decode=self.decode)
        for batch in _loader(data, self.num_workers, seed=self.order.seed):
            if generation != self._generation:  # load_state_dict moved the stream: this iterator is stale
                return
            self.position = advanced(self.position, 1)
            yield batch

    @property
    def epoch(self) -> int:
        """The epoch of the data order the next sample comes from."""
        return unread(self.order, self.position)[0]

    def state_dict(self) -> dict[str, Any]:
        p = self.position
        return {"version": STATE_VERSION, "order": self._order_facts(),
                "deal": [p.deal.ranks, p.deal.workers, p.deal.micro], "base_epoch": p.base_epoch,
                "base_pool": None if p.base_pool is None else [list(iv) for iv in p.base_pool],
                "micro_batches": p.micro_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"the checkpoint's data position has version {state.get('version')!r}, this dist_train "
                             f"reads {STATE_VERSION}; resume with the dist_train that wrote it, or start afresh")
        if state["order"] != self._order_facts():
            raise ValueError(f"the checkpoint's data order was {state['order']}, this run's is {self._order_facts()}: "
                             f"resume with the same shards, train.seed, data.shuffle_buffer, data.resample and "
                             f"data.repeated_augmentation (see config.yaml in train.run_dir), or start afresh in a new "
                             f"train.run_dir")
        pool = state["base_pool"]
        saved = StreamPosition(Deal(*state["deal"]), base_epoch=int(state["base_epoch"]),
                               base_pool=None if pool is None else tuple((int(a), int(b)) for a, b in pool),
                               micro_batches=int(state["micro_batches"]))
        self.position = redeal(self.order, saved, self.position.deal)
        if self.position is not saved and self.rank == 0:
            epoch, left = unread(self.order, self.position)
            log.warning("the data position was saved with %d ranks x %d workers x micro-batch %d; the %d samples left "
                        "of epoch %d are dealt afresh to %d x %d x %d", *state["deal"], sum(b - a for a, b in left),
                        epoch, self.position.deal.ranks, self.position.deal.workers, self.position.deal.micro)
        self._generation += 1

    def _order_facts(self) -> dict[str, Any]:
        o = self.order
        facts = {"seed": o.seed, "window": o.window, "resample": o.resample, "num_shards": len(o.shard_sizes),
                 "num_samples": sum(o.shard_sizes)}
        # Only when on, so that positions saved before repeated augmentation existed still load.
        return facts if o.repeats == 1 else {**facts, "repeats": o.repeats}


class _EvalWorkerData(torch.utils.data.IterableDataset):
    """One worker's contiguous range of this rank's range of the evaluation split, in manifest order."""

    def __init__(self, split: Split, start: int, stop: int, *, key: str, decode: Decode, micro: int):
        self.split, self.start, self.stop = split, start, stop
        self.key, self.decode, self.micro = key, decode, micro

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = self.stop - self.start
        lo, hi = self.start + n * worker // workers, self.start + n * (worker + 1) // workers
        starts = np.concatenate([self.split.starts, [self.split.num_samples]])
        reader = ShardReader(self.split.urls, names=self.split.names)
        images, labels, indices, bad = [], [], [], 0
        try:
            for shard in range(len(self.split.sizes)):
                a, b = max(lo, int(starts[shard])), min(hi, int(starts[shard + 1]))
                for offset, sample in reader.take(shard, range(a - int(starts[shard]), b - int(starts[shard]))):
                    try:
                        image, label = self.decode(sample[self.key]), int(sample["cls"])
                    except (BadSample, KeyError, ValueError):
                        bad += 1
                        continue
                    images.append(image)
                    labels.append(label)
                    indices.append(int(starts[shard]) + offset)
                    if len(images) == self.micro:
                        yield _eval_batch(images, labels, indices, bad)
                        images, labels, indices, bad = [], [], [], 0
            if images or bad:
                yield _eval_batch(images, labels, indices, bad)
        finally:
            reader.close()


def _eval_batch(images: list, labels: list, indices: list, bad: int) -> dict[str, torch.Tensor]:
    return {"image": torch.stack(images) if images else torch.zeros(0, dtype=torch.uint8),
            "label": torch.tensor(labels, dtype=torch.long), "index": torch.tensor(indices, dtype=torch.long),
            "bad_samples": torch.tensor(bad, dtype=torch.long)}


def eval_batches(manifest: dict[str, Any], cfg: DataConfig, *, micro_batch_size: int, rank: int, world_size: int,
                 split: str = "test") -> Iterable[dict[str, torch.Tensor]]:
    """One pass over this rank's share of the evaluation split; all ranks together see each sample once."""
    if split not in manifest["splits"] and split == "test" and "val" in manifest["splits"]:
        split = "val"
    shards = split_of(manifest, cfg, split)
    n = shards.num_samples
    start, stop = n * rank // world_size, n * (rank + 1) // world_size
    if stop <= start:
        return iter(())  # more ranks than samples: this one has none
    key, decode = image_decoder(manifest, train=False, image_size=cfg.image_size,
                                eval_image_size=cfg.eval_image_size, eval_resize=cfg.eval_resize)
    # No worker without a micro-batch of its own to decode: starting it would cost more than it saves.
    workers = min(cfg.num_workers, math.ceil((stop - start) / micro_batch_size))
    return _loader(_EvalWorkerData(shards, start, stop, key=key, decode=decode, micro=micro_batch_size), workers,
                   seed=0)


def _loader(data: torch.utils.data.IterableDataset, num_workers: int, *, seed: int) -> torch.utils.data.DataLoader:
    # Its own generator: worker seeds must not depend on the global RNG's state when the stream is
    # (re)created, or a resumed run would draw different augmentations than the uninterrupted one.
    return torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
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
