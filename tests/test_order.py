"""The training order's arithmetic (dist_train/data/order.py): true epochs, a global position, re-dealing.

Streams are simulated here the way the loader runs them: stream (rank, worker) draws the ranges
``stream_ranges`` gives it, and every rank draws the same number of micro-batches, its workers in turn.
"""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_train.data.order import Deal, EpochOrder, StreamPosition, advanced, redeal, stream_ranges, unread


def _in_turn(lanes):
    """The positions of ``lanes`` (lists of intervals) read in turn, one from each lane per round."""
    queues = [[p for lo, hi in lane for p in range(lo, hi)] for lane in lanes]
    return [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]


def _draw(order, position, stream, n):
    """The first ``n`` (epoch, order position) pairs ``stream`` reads from ``position``."""
    out = []
    if n == 0:
        return out
    for epoch, lanes in stream_ranges(order, position, stream):
        out += [(epoch, p) for p in _in_turn(lanes)[:n - len(out)]]
        if len(out) == n:
            return out
    raise AssertionError("unreachable: streams are endless")


def _consume(order, position, micro_batches_per_rank):
    """What the whole run reads when every rank draws ``micro_batches_per_rank`` micro-batches from ``position``."""
    deal, drawn = position.deal, position.micro_batches // position.deal.ranks
    seen = []
    for rank in range(deal.ranks):
        for worker in range(deal.workers):
            turns = sum(1 for i in range(drawn, drawn + micro_batches_per_rank) if i % deal.workers == worker)
            seen += _draw(order, position, deal.stream(rank, worker), turns * deal.micro)
    return seen


def _layout_samples(order, seen):
    """(epoch, shard, offset) of each (epoch, order position)."""
    out = []
    for epoch, p in seen:
        ((_, sample, _),) = order.picks(epoch, p, p + 1)
        layout = np.concatenate(list(order.windows(epoch, sample, sample + 1)))
        shard, offset = order.locate(epoch, layout)
        out.append((epoch, int(shard[0]), int(offset[0])))
    return out


deals = st.builds(Deal, ranks=st.integers(1, 4), workers=st.integers(1, 3), micro=st.integers(1, 7))
orders = st.builds(EpochOrder, shard_sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6).map(tuple),
                   seed=st.integers(0, 2**40), window=st.sampled_from([0, 1, 4, 9]))
# The same, with and without repeated augmentation: what holds of order positions holds for both.
any_orders = st.builds(EpochOrder, shard_sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6).map(tuple),
                       seed=st.integers(0, 2**40), window=st.sampled_from([0, 1, 4, 9]),
                       repeats=st.sampled_from([1, 2, 3]))


@settings(max_examples=60, deadline=None)
@given(order=orders, deal=deals, epochs=st.integers(1, 3))
def test_whole_epochs_read_every_sample_exactly_once_per_epoch(order, deal, epochs):
    n = order.length(0)
    position = StreamPosition(deal)
    per_round = deal.ranks * deal.micro
    under = _consume(order, position, epochs * n // per_round)  # up to the last partial micro-batch
    over = _consume(order, position, -(-epochs * n // per_round))
    samples = Counter((shard, offset) for _, shard, offset in _layout_samples(order, under))
    assert max(samples.values(), default=0) <= epochs and len(under) == len(set(under))
    total = Counter((shard, offset) for _, shard, offset in _layout_samples(order, over))
    assert len(total) == n and min(total.values()) >= epochs
    # Each epoch's samples are the whole dataset, each once: per epoch, the positions are distinct.
    for e in range(epochs):
        in_epoch = [p for epoch, p in over if epoch == e]
        assert sorted(in_epoch) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(order=any_orders, deal=deals, new=deals, first=st.integers(0, 12), second=st.integers(1, 12))
def test_a_position_redealt_to_other_ranks_and_workers_reads_the_rest_of_the_epoch_once(order, deal, new, first,
                                                                                      second):
    n = order.length(0)
    start = StreamPosition(deal)
    before = _consume(order, start, first)
    moved = redeal(order, advanced(start, first), new)
    after = _consume(order, moved, second)
    epoch, left = unread(order, advanced(start, first))
    if new != deal:  # the same deal continues unchanged, which is what makes resume exact
        assert (moved.base_epoch, moved.base_pool, moved.micro_batches) == (epoch, left, 0)
    both = Counter(before + after)
    assert max(both.values()) == 1  # no (epoch, position) twice
    current = [p for e, p in before + after if e == epoch]
    if len(after) >= sum(hi - lo for lo, hi in left):  # the new deal finished the interrupted epoch
        assert sorted(current) == list(range(n))


@settings(max_examples=40, deadline=None)
@given(order=any_orders, deal=deals, steps=st.lists(st.integers(0, 5), min_size=1, max_size=6))
def test_the_position_after_any_steps_is_the_uninterrupted_one(order, deal, steps):
    # However the micro-batches were grouped into steps (the global batch changing), the position is their
    # count, and a stream restarted there reads what the uninterrupted stream reads next.
    position = StreamPosition(deal)
    for k in steps:
        position = advanced(position, k)
    total = sum(steps)
    whole = _consume(order, StreamPosition(deal), total + 2)
    resumed = _consume(order, position, 2)
    assert Counter(resumed) == Counter(whole) - Counter(_consume(order, StreamPosition(deal), total))


def test_each_epoch_has_its_own_order_and_the_windows_permute_the_layout():
    order = EpochOrder(tuple([50] * 6), seed=7, window=16)
    first, second = (np.concatenate(list(order.windows(e, 0, 300))) for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(300))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(300))
    assert not np.array_equal(order.shards(0), order.shards(1))
    # A window's samples stay within it: at most `window` apart in the layout.
    windows = list(order.windows(0, 0, 300))
    assert all(w.max() - w.min() < 16 for w in windows) and sum(map(len, windows)) == 300
    # The same seed, the same order; another seed, another one.
    assert np.array_equal(first, np.concatenate(list(EpochOrder(tuple([50] * 6), seed=7, window=16).windows(0, 0, 300))))
    assert not np.array_equal(first, np.concatenate(list(EpochOrder(tuple([50] * 6), seed=8, window=16).windows(0, 0, 300))))


def test_resampling_draws_shards_with_replacement():
    order = EpochOrder(tuple(range(1, 41)), seed=0, resample=True)
    drawn = [order.shards(e) for e in range(5)]
    assert any(len(set(d.tolist())) < 40 for d in drawn)  # some shard twice in an epoch
    assert order.length(0) == sum(int(s) + 1 for s in drawn[0])


def test_streams_read_contiguous_ranges_so_workers_read_their_shards_front_to_back():
    # At ImageNet's shape, scaled down: a stream's share of an epoch is one range, not every S-th micro-batch.
    order, deal = EpochOrder(tuple([1000] * 64), seed=0), Deal(ranks=8, workers=4, micro=32)
    for stream in range(deal.streams):
        ranges = []
        for epoch, lanes in stream_ranges(order, StreamPosition(deal), stream):
            if epoch > 0:
                break
            (lane,) = lanes
            ranges += lane
        assert len(ranges) == 1 and 1900 <= ranges[0][1] - ranges[0][0] <= 2100


def test_a_bad_order_or_deal_is_refused():
    with pytest.raises(ValueError, match="shards holding samples"):
        EpochOrder((), seed=0)
    with pytest.raises(ValueError, match="ranks, workers and micro"):
        Deal(ranks=0, workers=1, micro=4)


# --- repeated augmentation --------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(order=orders, repeats=st.integers(2, 4), deal=deals, epochs=st.integers(1, 2))
def test_a_repeated_epoch_draws_its_first_ceil_n_over_k_samples_k_times_each(order, repeats, deal, epochs):
    n = order.length(0)
    repeated = replace(order, repeats=repeats)
    over = _consume(repeated, StreamPosition(deal), -(-epochs * n // (deal.ranks * deal.micro)))
    for e in range(epochs):
        in_epoch = [p for epoch, p in over if epoch == e]
        assert sorted(in_epoch) == list(range(n))  # an epoch is still n draws, each position once
        drawn = Counter(_layout_samples(repeated, [(e, p) for p in in_epoch]))
        # What it draws, from the unrepeated order of the same epoch: its first ceil(n / k) samples.
        first = _layout_samples(order, [(e, i) for i in range(-(-n // repeats))])
        assert set(drawn) == set(first) and drawn.total() == n
        assert all(drawn[s] == repeats for s in first[:n // repeats])  # the last few may have fewer copies


def _where_drawn(order, deal, micro_batches_per_rank):
    """{(epoch, shard, offset): [(rank, the rank's micro-batch index)] of each of its copies} from the start."""
    where = {}
    for rank in range(deal.ranks):
        for worker in range(deal.workers):
            turns = [i for i in range(micro_batches_per_rank) if i % deal.workers == worker]
            seen = _draw(order, StreamPosition(deal), deal.stream(rank, worker), len(turns) * deal.micro)
            for n, sample in enumerate(_layout_samples(order, seen)):
                where.setdefault(sample, []).append((rank, turns[n // deal.micro]))
    return where


@pytest.mark.parametrize("ranks, workers", [(8, 2), (4, 3), (1, 2)])
def test_the_copies_of_a_sample_are_drawn_in_one_step_on_consecutive_ranks(ranks, workers):
    # torchvision's RASampler puts the copies of a sample on consecutive ranks at the same place; so does the deal,
    # but for the periods cut by the epoch's boundaries. Here 9 of 9.4 periods of 8-sample micro-batches are whole.
    order, deal = EpochOrder(tuple([100] * 12), seed=5, window=16, repeats=3), Deal(ranks=ranks, workers=workers, micro=8)
    n, per_round = order.length(0), ranks * deal.micro
    where = {s: w for s, w in _where_drawn(order, deal, n // per_round).items() if s[0] == 0}
    assert sum(map(len, where.values())) == n // per_round * per_round
    together = 0
    for copies in where.values():
        used = sorted(r for r, _ in copies)
        steps = [i for _, i in copies]
        if len(copies) == 3 and max(steps) - min(steps) <= workers:  # in the same round of the rank's workers
            together += 1
            if ranks >= 3:  # three ranks r, r + 1, r + 2 (mod R)
                assert len(set(used)) == 3 and any(sorted((r + c) % ranks for c in range(3)) == used for r in used)
            else:
                assert used == [0, 0, 0]
    period = deal.streams * deal.micro
    whole = n // period * period // 3  # samples whose copies lie in whole periods
    assert together >= whole >= 0.8 * len(where)
