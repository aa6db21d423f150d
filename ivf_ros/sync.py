"""Approximate-time pairing of an IR (channel 0) and a visible (channel 1) stream, free of ROS.

Like ``message_filters.ApproximateTimeSynchronizer``, each channel queues at most ``queue_size`` items, and a new
item pairs with the other channel's item closest in time when their stamps differ by at most ``slop`` seconds. Unlike
it (and why the node uses this one everywhere): items older than a pair are dropped at once (a stale backlog is never
paired later), a stamp that goes back by more than ``reset_after`` seconds on its channel (a looping bag, a restarted
camera) empties both queues first, and every drop is counted.
"""
from __future__ import annotations

import bisect
import math
import threading


class ApproximateTimeSynchronizer:
    """Pair items of two channels by stamp; thread-safe. Counters: ``pairs``, ``dropped`` (per channel), ``resets``."""

    def __init__(self, queue_size: int = 10, slop: float = 0.05, reset_after: float = 1.0):
        if int(queue_size) < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        if not slop >= 0.0:
            raise ValueError(f"slop must be >= 0 seconds, not {slop}")
        if not reset_after > 0.0:
            raise ValueError(f"reset_after must be > 0 seconds, not {reset_after}")
        self.queue_size = int(queue_size)
        self.slop = float(slop)
        self.reset_after = float(reset_after)
        self.pairs = 0
        self.dropped = [0, 0]
        self.resets = 0
        self._stamps: tuple[list[float], list[float]] = ([], [])  # sorted, parallel to _items
        self._items: tuple[list, list] = ([], [])
        self._last_stamp: list[float | None] = [None, None]
        self._lock = threading.Lock()

    def push(self, channel: int, stamp: float, item) -> list[tuple]:
        """Add ``item`` stamped ``stamp`` (s) on ``channel``; returns the pairs ``(ir_item, vis_item)`` it made."""
        if channel not in (0, 1):
            raise ValueError(f"channel must be 0 (IR) or 1 (visible), not {channel}")
        stamp = float(stamp)
        if not math.isfinite(stamp):
            raise ValueError(f"stamp must be finite, not {stamp}")
        with self._lock:
            last = self._last_stamp[channel]
            if last is not None and stamp < last - self.reset_after:
                self._clear()  # both channels start afresh, so the other one's jump back does not reset again
                self._last_stamp = [None, None]
                self.resets += 1
            self._last_stamp[channel] = stamp
            match = self._closest(1 - channel, stamp)
            if match is None:
                self._insert(channel, stamp, item)
                return []
            other = self._items[1 - channel][match]
            self._drop_front(1 - channel, match + 1, counted=match)
            mine = bisect.bisect_left(self._stamps[channel], stamp)
            self._drop_front(channel, mine, counted=mine)
            self.pairs += 1
            return [(item, other) if channel == 0 else (other, item)]

    def reset(self) -> None:
        """Forget queued items (counted as dropped) and last stamps; counters other than ``resets`` are kept."""
        with self._lock:
            self._clear()
            self._last_stamp = [None, None]
            self.resets += 1

    def pending(self) -> tuple[int, int]:
        """Items waiting for a partner on each channel."""
        with self._lock:
            return len(self._stamps[0]), len(self._stamps[1])

    def _closest(self, channel: int, stamp: float) -> int | None:
        stamps = self._stamps[channel]
        i = bisect.bisect_left(stamps, stamp)
        candidates = [j for j in (i - 1, i) if 0 <= j < len(stamps)]
        if not candidates:
            return None
        best = min(candidates, key=lambda j: abs(stamps[j] - stamp))
        return best if abs(stamps[best] - stamp) <= self.slop else None

    def _insert(self, channel: int, stamp: float, item) -> None:
        stamps, items = self._stamps[channel], self._items[channel]
        i = bisect.bisect_left(stamps, stamp)
        if i < len(stamps) and stamps[i] == stamp:  # same stamp again: the newer message replaces the older
            items[i] = item
            self.dropped[channel] += 1
        else:
            stamps.insert(i, stamp)
            items.insert(i, item)
        overflow = len(stamps) - self.queue_size
        if overflow > 0:
            self._drop_front(channel, overflow, counted=overflow)

    def _drop_front(self, channel: int, n: int, counted: int) -> None:
        del self._stamps[channel][:n]
        del self._items[channel][:n]
        self.dropped[channel] += counted

    def _clear(self) -> None:
        for channel in (0, 1):
            self._drop_front(channel, len(self._stamps[channel]), counted=len(self._stamps[channel]))
