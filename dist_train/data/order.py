"""Which sample every rank and worker reads next, as arithmetic on a few integers.

Nothing here holds a buffer or an iterator, so the training data's position is a small, global record
and resuming from it costs the same at step 10 and at epoch 80. Three layers (docs/data.md):

1. **The epoch order** (``EpochOrder``): the shards of epoch ``e`` in a seeded permutation (or drawn with
   replacement), laid end to end, then permuted inside windows of ``window`` consecutive samples whose
   boundaries shift every epoch. A pure function of (seed, epoch, position): there is no shuffle buffer
   to checkpoint. With repeated augmentation (``repeats`` k > 1) the epoch keeps its length N but is k passes
   over the first ceil(N / k) samples of that permutation, and the deal puts the k copies of a sample in the
   same step on consecutive ranks (``_repeated_plans``).
2. **The deal** (``Deal``): the run's sample sequence is cut into micro-batches of ``micro`` samples; global
   micro-batch ``j`` goes to rank ``j mod R`` and, on that rank, to worker ``(j div R) mod W``, which is the
   order in which a DataLoader takes batches from its workers. So once every rank has drawn ``k``
   micro-batches, exactly the first ``k * R * micro`` samples have been consumed, whatever the global
   batch size did meanwhile. Within an epoch, each stream's (rank's worker's) samples are one contiguous
   range of the epoch order (with repeats k: k ranges read in turn, plus two short ones), so a worker reads
   its shards front to back; striding over micro-batches instead would make every worker read every shard.
3. **The position** (``StreamPosition``): the epoch in which the current deal began, the parts of that
   epoch still unread at that moment (all of it, unless the deal changed mid-epoch), the deal, and the
   global count of micro-batches drawn since. It says what the run has read, not where one worker stands,
   so another deal (another number of ranks or workers) can take over the rest of the epoch: ``redeal``.

Why not upstream: webdataset's shard lists, shuffle buffers and ``with_epoch`` keep their position inside
live iterators, so its pipelines resume only by replaying; torchdata's ``StatefulDataLoader`` saves worker
positions only for datasets that have a ``state_dict`` of their own, which is what this module provides;
``wids`` gives indexed access but copies whole shards into a local cache, against streaming them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np

Interval = tuple[int, int]
"""Half-open ``[start, stop)`` positions of one epoch's order."""
Lane = tuple[Interval, ...]
"""Positions read one after another."""
Read = tuple[Lane, ...]
"""Lanes read in turn, one position from each in every round; no lane is longer than the one before it, nor
shorter by more than one position. A single lane reads its positions in order."""

_SHARDS_SALT, _WINDOW_SALT = 0x5A4D, 0x57494E  # keep the two kinds of draw apart in one seed space
_PIECE = 256  # layout positions handed out at a time when nothing is permuted


@dataclass(frozen=True)
class EpochOrder:
    """The training order of each epoch: a pure function of (seed, epoch, position).

    Positions of epoch ``e`` run over ``[0, length(e))``. ``layout`` positions lay the epoch's shards end to
    end; the order permutes them within windows. ``order_positions`` maps order positions to layout
    positions, ``locate`` layout positions to (shard, offset in shard).
    """

    shard_sizes: tuple[int, ...]
    seed: int
    window: int = 0
    """Samples permuted together (0: read each shard in its stored order). A worker holds up to this many
    encoded samples, and reads up to two windows beyond its share of an epoch (reading, not decoding)."""
    resample: bool = False
    """Draw each epoch's shards with replacement instead of permuting them (webdataset's resampling)."""
    repeats: int = 1
    """Repeated augmentation: an epoch of N positions is ``repeats`` passes over the first ceil(N / repeats)
    samples of its permuted order (``passes``), so each of them is drawn that many times, with other
    augmentations (each position seeds its own), and the others not at all that epoch."""

    def __post_init__(self) -> None:
        if not self.shard_sizes or min(self.shard_sizes) < 0 or sum(self.shard_sizes) == 0:
            raise ValueError(f"EpochOrder needs shards holding samples, got sizes {self.shard_sizes[:8]}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % 2**63, *key])

    @functools.lru_cache(maxsize=8)
    def shards(self, epoch: int) -> np.ndarray:
        """The shard ids of ``epoch`` in layout order."""
        rng = self._rng(_SHARDS_SALT, epoch)
        n = len(self.shard_sizes)
        return rng.integers(0, n, size=n) if self.resample else rng.permutation(n)

    @functools.lru_cache(maxsize=8)
    def _starts(self, epoch: int) -> np.ndarray:
        """Layout position at which each shard of ``epoch`` begins, plus the epoch's length at the end."""
        sizes = np.asarray(self.shard_sizes, dtype=np.int64)[self.shards(epoch)]
        return np.concatenate([[0], np.cumsum(sizes)])

    def length(self, epoch: int) -> int:
        """Samples in ``epoch``: the dataset's size, or with resampling the size of the shards drawn."""
        return int(self._starts(epoch)[-1])

    def _rotation(self, epoch: int) -> int:
        return int(self._rng(_WINDOW_SALT, epoch).integers(0, self.window)) if self.window > 1 else 0

    def passes(self, epoch: int) -> np.ndarray:
        """Order position at which each pass of ``epoch`` begins, then the epoch's length. Pass c holds
        ceil((N - c) / repeats) positions, and its i-th position draws the permuted sample i."""
        n, k = self.length(epoch), self.repeats
        return np.concatenate([[0], np.cumsum([(n - c + k - 1) // k for c in range(k)])]).astype(np.int64)

    def picks(self, epoch: int, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """``(order position, first, stop)``: order positions ``[start, stop)`` draw the permuted samples
        ``[first, stop)`` of ``epoch`` (the positions ``windows`` takes), in pieces that each lie in one pass."""
        starts = self.passes(epoch)
        for c in range(self.repeats):
            lo, hi = max(start, int(starts[c])), min(stop, int(starts[c + 1]))
            if lo < hi:
                yield lo, lo - int(starts[c]), hi - int(starts[c])

    def windows(self, epoch: int, start: int, stop: int) -> Iterator[np.ndarray]:
        """The layout positions of the permuted samples ``[start, stop)``, one array per window they touch.
        Without repeats, the permuted sample i is the one at order position i."""
        if self.window <= 1:  # the stored order, in pieces: nothing needs holding back
            for lo in range(start, stop, _PIECE):
                yield np.arange(lo, min(lo + _PIECE, stop), dtype=np.int64)
            return
        rot, length = self._rotation(epoch), self.length(epoch)
        # Window 0 is [0, rot); window i >= 1 is [rot + (i-1) * window, rot + i * window), cut at the end.
        first = 0 if start < rot else 1 + (start - rot) // self.window
        while True:
            lo = 0 if first == 0 else rot + (first - 1) * self.window
            hi = min(rot if first == 0 else lo + self.window, length)
            if lo >= stop:
                return
            if hi > lo:
                perm = self._rng(_WINDOW_SALT, epoch, first).permutation(hi - lo)
                yield lo + perm[max(start, lo) - lo:min(stop, hi) - lo]
            first += 1

    def locate(self, epoch: int, layout_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, offset in that shard) of each layout position of ``epoch``."""
        starts = self._starts(epoch)
        slot = np.searchsorted(starts, layout_positions, side="right") - 1
        return self.shards(epoch)[slot], layout_positions - starts[slot]


@dataclass(frozen=True)
class Deal:
    """How micro-batches are dealt: ``ranks`` x ``workers`` streams of ``micro``-sample micro-batches.

    Stream ``s = rank + ranks * worker`` gets global micro-batches ``j = s, s + S, s + 2S, ...`` (S streams).
    """

    ranks: int
    workers: int
    micro: int

    def __post_init__(self) -> None:
        if min(self.ranks, self.workers, self.micro) < 1:
            raise ValueError(f"a deal needs ranks, workers and micro >= 1, got {self}")

    @property
    def streams(self) -> int:
        return self.ranks * self.workers

    def stream(self, rank: int, worker: int) -> int:
        return rank + self.ranks * worker

    def samples_before(self, stream: int | np.ndarray, total: int) -> Any:
        """Samples of ``stream`` among the first ``total`` samples of the sequence (vectorised over streams)."""
        period = self.streams * self.micro
        return (total // period) * self.micro + np.clip(total % period - np.asarray(stream) * self.micro,
                                                        0, self.micro)


@dataclass(frozen=True)
class StreamPosition:
    """Where the training data stands, for every rank at once (see the module's docstring)."""

    deal: Deal
    base_epoch: int = 0
    base_pool: tuple[Interval, ...] | None = None
    """Order positions of ``base_epoch`` still unread when the deal began; None: the whole epoch."""
    micro_batches: int = 0
    """Global micro-batches drawn since the deal began: every rank's count times the number of ranks."""

    @property
    def samples(self) -> int:
        """Samples drawn since the deal began."""
        return self.micro_batches * self.deal.micro


def _segment(order: EpochOrder, position: StreamPosition, i: int) -> tuple[int, tuple[Interval, ...], bool]:
    """Segment ``i`` of the sequence since the deal began: the unread pool of the base epoch, then whole
    epochs. Returns (epoch, its order intervals, whether they are the whole epoch)."""
    epoch = position.base_epoch + i
    if i == 0 and position.base_pool is not None:
        return epoch, position.base_pool, False
    return epoch, ((0, order.length(epoch)),), True


def _pool_slice(pool: Sequence[Interval], start: int, stop: int) -> Iterator[Interval]:
    """Order intervals of pool coordinates ``[start, stop)`` (the pool's intervals laid end to end)."""
    at = 0
    for lo, hi in pool:
        n = hi - lo
        a, b = max(start - at, 0), min(stop - at, n)
        if a < b:
            yield lo + a, lo + b
        at += n
        if at >= stop:
            return


def _pool_size(pool: Sequence[Interval]) -> int:
    return sum(hi - lo for lo, hi in pool)


def _shares(deal: Deal, seg_start: int, seg_stop: int) -> np.ndarray:
    """Samples each stream draws from the segment spanning sequence samples ``[seg_start, seg_stop)``."""
    streams = np.arange(deal.streams)
    return deal.samples_before(streams, seg_stop) - deal.samples_before(streams, seg_start)


def _plans(order: EpochOrder, deal: Deal, epoch: int, *, whole: bool, seg_start: int,
           seg_stop: int) -> list[list[Read]]:
    """What each stream reads of the segment spanning sequence samples ``[seg_start, seg_stop)``, in pool
    coordinates and in the order it draws them. Plainly, one contiguous range per stream, the streams' ranges
    in stream order."""
    shares = _shares(deal, seg_start, seg_stop)
    if order.repeats > 1 and whole:
        return _repeated_plans(order, deal, epoch, shares, seg_start=seg_start, seg_stop=seg_stop)
    offsets = np.concatenate([[0], np.cumsum(shares)])
    return [[(((int(offsets[s]), int(offsets[s + 1])),),)] for s in range(deal.streams)]


def _repeated_plans(order: EpochOrder, deal: Deal, epoch: int, shares: np.ndarray, *, seg_start: int,
                    seg_stop: int) -> list[list[Read]]:
    """A whole epoch with repeats k: the k copies of a sample in one step, on k consecutive ranks (torchvision's
    RASampler puts them there too), each stream still reading a few contiguous ranges.

    The segment's whole periods (one micro-batch for every stream) are its core, in which every stream draws
    the same K samples (K a multiple of k). Core draw k * j + c of rank r's worker w is copy c (pass c) of the
    j-th sample of the block that rank (r - c) mod R, worker w, owns: the blocks of D = K / k samples tile
    the first S * D permuted samples. So the copies fall at adjacent draws of one period, on ranks r, r + 1,
    ... (mod R; on one rank for R = 1). The rest of each pass (the periods cut by the epoch's boundaries, at
    most one period's S * micro samples an epoch) is dealt plainly, before and after the core, and its copies
    meet at other times."""
    k, ranks, streams, period = order.repeats, deal.ranks, deal.streams, deal.streams * deal.micro
    first, last = -(-seg_start // period), seg_stop // period  # the whole periods [first, last)
    core_start = min(first * period, seg_stop)
    core = max(last - first, 0) * deal.micro
    core -= core % k
    block = core // k
    all_streams = np.arange(streams)
    head = deal.samples_before(all_streams, core_start) - deal.samples_before(all_streams, seg_start)
    passes = order.passes(epoch)
    rest = [(int(passes[c]) + streams * block, int(passes[c + 1])) for c in range(k)]  # pool coordinates
    rest_offsets = np.concatenate([[0], np.cumsum(shares - core)])
    plans = []
    for s in range(streams):
        rank, worker = s % ranks, s // ranks
        owners = [(rank - c) % ranks + ranks * worker for c in range(k)]
        lanes = tuple(((int(passes[c]) + o * block, int(passes[c]) + (o + 1) * block),) for c, o in enumerate(owners))
        lo, mid, hi = int(rest_offsets[s]), int(rest_offsets[s] + head[s]), int(rest_offsets[s + 1])
        plans.append([(tuple(_pool_slice(rest, lo, mid)),), lanes, (tuple(_pool_slice(rest, mid, hi)),)])
    return plans


def _lane_counts(read: Read, drawn: int) -> list[int]:
    """Positions taken from each lane of ``read`` by its first ``drawn`` draws (lanes in turn)."""
    n = len(read)
    return [min(_pool_size(lane), max(0, -(-(drawn - i) // n))) for i, lane in enumerate(read)]


def _taken(plan: Sequence[Read], drawn: int) -> Iterator[Interval]:
    """The pool intervals that the first ``drawn`` draws of ``plan`` read."""
    for read in plan:
        for lane, count in zip(read, _lane_counts(read, drawn)):
            yield from _pool_slice(lane, 0, count)
        drawn = max(drawn - sum(_pool_size(lane) for lane in read), 0)


def _after(plan: Sequence[Read], drawn: int) -> Iterator[Read]:
    """``plan`` without its first ``drawn`` draws: the lane whose turn is next comes first."""
    for read in plan:
        size = sum(_pool_size(lane) for lane in read)
        if drawn < size:
            rest = [tuple(_pool_slice(lane, count, _pool_size(lane))) for lane, count in
                    zip(read, _lane_counts(read, drawn))]
            turn = drawn % len(read)
            yield tuple(lane for lane in rest[turn:] + rest[:turn] if lane)
        drawn = max(drawn - size, 0)


def stream_ranges(order: EpochOrder, position: StreamPosition, stream: int) -> Iterator[tuple[int, Read]]:
    """What ``stream`` reads from ``position`` on, endlessly: ``(epoch, lanes of order intervals)``, the lanes
    read in turn (a single lane, read in order, unless repeated augmentation interleaves the copies)."""
    deal = position.deal
    drawn = int(deal.samples_before(stream, position.samples))  # this stream's samples already consumed
    seg_start, i = 0, 0
    while True:
        epoch, pool, whole = _segment(order, position, i)
        seg_stop = seg_start + _pool_size(pool)
        mine_start = int(deal.samples_before(stream, seg_start))
        mine_stop = int(deal.samples_before(stream, seg_stop))
        if mine_stop > drawn:
            plan = _plans(order, deal, epoch, whole=whole, seg_start=seg_start, seg_stop=seg_stop)[stream]
            for read in _after(plan, max(drawn - mine_start, 0)):
                yield epoch, tuple(tuple(iv for lo, hi in lane for iv in _pool_slice(pool, lo, hi)) for lane in read)
        seg_start, i = seg_stop, i + 1


def unread(order: EpochOrder, position: StreamPosition) -> tuple[int, tuple[Interval, ...]]:
    """The epoch the run is in and the order intervals of it not yet consumed: what any deal must still
    read of it, and what ``redeal`` hands to a new one."""
    deal, consumed = position.deal, position.samples
    seg_start, i = 0, 0
    while True:
        epoch, pool, whole = _segment(order, position, i)
        seg_stop = seg_start + _pool_size(pool)
        if consumed < seg_stop:
            break
        seg_start, i = seg_stop, i + 1
    plans = _plans(order, deal, epoch, whole=whole, seg_start=seg_start, seg_stop=seg_stop)
    streams = np.arange(deal.streams)
    taken = deal.samples_before(streams, consumed) - deal.samples_before(streams, seg_start)
    done = _merge([iv for s, plan in enumerate(plans) for iv in _taken(plan, int(taken[s]))])
    gaps, at = [], 0  # pool coordinates not yet taken
    for lo, hi in (*done, (seg_stop - seg_start, seg_stop - seg_start)):
        if at < lo:
            gaps.append((at, lo))
        at = hi
    return epoch, _merge([iv for lo, hi in gaps for iv in _pool_slice(pool, lo, hi)])


def redeal(order: EpochOrder, position: StreamPosition, deal: Deal) -> StreamPosition:
    """The same data position under another deal: the rest of the current epoch goes to ``deal``'s streams,
    and later epochs are dealt in full. Same-deal positions are returned unchanged (exact resume)."""
    if deal == position.deal:
        return position
    epoch, pool = unread(order, position)
    return StreamPosition(deal=deal, base_epoch=epoch, base_pool=pool, micro_batches=0)


def advanced(position: StreamPosition, micro_batches_per_rank: int) -> StreamPosition:
    """The position after every rank drew ``micro_batches_per_rank`` more micro-batches."""
    return replace(position, micro_batches=position.micro_batches + micro_batches_per_rank * position.deal.ranks)


def _merge(intervals: Sequence[Interval]) -> tuple[Interval, ...]:
    out: list[Interval] = []
    for lo, hi in sorted(intervals):
        if out and out[-1][1] >= lo:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif hi > lo:
            out.append((lo, hi))
    return tuple(out)
