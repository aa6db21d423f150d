"""Approximate-time pairing on crafted stamp sequences (the only synchroniser the node and the bag tools use)."""
import math

import pytest

from ivf_ros.sync import ApproximateTimeSynchronizer

IR, VIS = 0, 1


@pytest.fixture
def make_sync():
    return ApproximateTimeSynchronizer


def _feed(sync, events):
    pairs = []
    for channel, stamp in events:
        pairs += sync.push(channel, stamp, (channel, stamp))
    return [(ir[1], vis[1]) for ir, vis in pairs]


def test_jittered_streams_pair_one_to_one(make_sync):
    jitter = [0.012, -0.008, 0.004, -0.015, 0.0, 0.009, -0.003, 0.014]
    events = []
    for i, j in enumerate(jitter):
        events += [(VIS, 1.0 + i / 30), (IR, 1.0 + i / 30 + j)]
    sync = make_sync(queue_size=10, slop=0.02)
    assert _feed(sync, events) == [(1.0 + i / 30 + j, 1.0 + i / 30) for i, j in enumerate(jitter)]
    assert sync.pairs == len(jitter)


def test_nothing_pairs_beyond_the_slop(make_sync):
    sync = make_sync(queue_size=10, slop=0.05)
    assert _feed(sync, [(IR, 1.0), (VIS, 1.2), (IR, 1.4), (VIS, 1.6)]) == []
    assert sync.pairs == 0


def test_the_closest_partner_wins(make_sync):
    sync = make_sync(queue_size=10, slop=0.05)
    assert _feed(sync, [(IR, 1.00), (IR, 1.03), (VIS, 1.025)]) == [(1.03, 1.025)]


def test_queue_size_bounds_what_waits(make_sync):
    sync = make_sync(queue_size=3, slop=0.01)
    events = [(IR, 1.0 + 0.1 * i) for i in range(5)]  # 1.0 and 1.1 are pushed out by 1.2 .. 1.4
    assert _feed(sync, events + [(VIS, 1.0), (VIS, 1.105)]) == []
    assert _feed(sync, [(VIS, 1.4)]) == [(1.4, 1.4)]


def test_time_going_back_resets(make_sync):
    sync = make_sync(queue_size=10, slop=0.05)
    assert _feed(sync, [(IR, 100.0), (VIS, 100.5)]) == []
    assert _feed(sync, [(IR, 1.0)]) == [] and sync.resets == 1  # bag looped: the old visible 100.5 is gone
    assert _feed(sync, [(IR, 100.49)]) == []
    assert _feed(sync, [(VIS, 1.01)]) == [(1.0, 1.01)]


def test_stale_backlog_is_dropped_at_once():
    sync = ApproximateTimeSynchronizer(queue_size=10, slop=0.02)
    assert _feed(sync, [(IR, 1.0), (IR, 1.1), (IR, 1.2), (VIS, 0.9), (VIS, 1.21)]) == [(1.2, 1.21)]
    assert sync.dropped == [2, 1] and sync.pending() == (0, 0)
    assert _feed(sync, [(VIS, 1.105)]) == []  # 1.1 was stale: it never pairs later


def test_overflow_and_duplicates_count_as_dropped():
    sync = ApproximateTimeSynchronizer(queue_size=2, slop=0.01)
    _feed(sync, [(VIS, 1.0), (VIS, 2.0), (VIS, 3.0), (VIS, 3.0)])
    assert sync.dropped == [0, 2] and sync.pending() == (0, 2)
    sync.reset()
    assert sync.dropped == [0, 4] and sync.pending() == (0, 0) and sync.resets == 1


def test_small_backwards_steps_do_not_reset():
    sync = ApproximateTimeSynchronizer(queue_size=10, slop=0.01, reset_after=1.0)
    assert _feed(sync, [(IR, 5.0), (IR, 4.5), (VIS, 4.505)]) == [(4.5, 4.505)]
    assert sync.resets == 0


@pytest.mark.parametrize("kwargs, call, message", [
    ({"queue_size": 0}, None, "queue_size"),
    ({"slop": -0.1}, None, "slop"),
    ({"reset_after": 0.0}, None, "reset_after"),
    ({}, (2, 1.0), "channel"),
    ({}, (0, math.nan), "finite"),
])
def test_bad_arguments_are_rejected(kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        sync = ApproximateTimeSynchronizer(**kwargs)
        sync.push(call[0], call[1], None)
