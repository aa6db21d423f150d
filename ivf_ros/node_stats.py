"""fusion_node's statistics and diagnostics: counters, robust latency windows, rate-limited warnings, the status.

Latency is the time from an output's visible stamp to its publication. A stamp far in the future or far in the past
(another machine's clock, a replay without use_sim_time) gives no latency: such samples are counted, not kept, and
the window restarts with the synchroniser (a bag loop), so one odd stamp cannot move the percentiles.
"""
from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from .errors import one_line
from .streams import IR, STREAM_NAMES, VIS

WARN_PERIOD_S = 5.0  # the same problem is reported at most once per period
LATENCY_RANGE_S = (-1.0, 10.0)  # plausible latencies: clocks may differ a little, a live pipeline is never 10 s late


class Samples:
    """The last ``size`` values inside ``[low, high]``; values outside are counted in ``ignored``."""

    def __init__(self, low: float = -math.inf, high: float = math.inf, size: int = 2000):
        self.low, self.high = low, high
        self.values: deque[float] = deque(maxlen=size)
        self.ignored = 0

    def add(self, value: float) -> None:
        if self.low <= value <= self.high:
            self.values.append(value)
        else:
            self.ignored += 1

    def reset(self) -> None:
        self.values.clear()

    def percentiles_ms(self) -> tuple[float, float, float] | None:
        if not self.values:
            return None
        return tuple(float(v) for v in np.percentile(np.asarray(self.values) * 1e3, (50, 90, 99)))


class NodeStats:
    """Counters of one activation of the node."""

    def __init__(self):
        now = time.monotonic()
        self.received, self.bad = [0, 0], [0, 0]
        self.last_rx, self.silent = [now, now], [False, False]
        self.rate_window = (now, [0, 0])
        self.fused = self.skipped = self.unheard = self.errors = 0
        self.camera_info = None  # the latest sensor_msgs/CameraInfo
        self.camera_info_count = self.bad_camera_info = 0
        self.problem = (-math.inf, "")
        self.latency = Samples(*LATENCY_RANGE_S)
        self.processing = Samples(0.0)

    def arrived(self, channel: int, now: float) -> float | None:
        """Count an image; returns how long the input was silent when it comes back, else None."""
        self.received[channel] += 1
        back = now - self.last_rx[channel] if self.silent[channel] else None
        self.silent[channel] = False
        self.last_rx[channel] = now
        return back

    def silences(self, now: float, timeout: float, topics: list[str]) -> list[tuple[str, str]]:
        """(key, warning) for each silent input."""
        quiet = [now - self.last_rx[ch] for ch in (IR, VIS)]
        self.silent = [q > timeout for q in quiet]
        if all(self.silent):
            return [("silent", f"no images on {' or '.join(topics)} for {min(quiet):.1f} s")]
        return [(f"silent{ch}", f"{STREAM_NAMES[ch]} input {topics[ch]}: "
                                f"{'no images yet' if self.received[ch] == 0 else f'no images for {quiet[ch]:.1f} s'}"
                                " (the other input is live)") for ch in (IR, VIS) if self.silent[ch]]

    def status(self, name: str, hardware: str, active: bool, sync, backend: str, info_topic: str,
               period: float) -> DiagnosticStatus:
        """The node's health: rates, pairs, drops, latency, camera info, device."""
        now = time.monotonic()
        since, counts = self.rate_window
        rates = [(self.received[ch] - counts[ch]) / max(now - since, 1e-3) for ch in (IR, VIS)]
        self.rate_window = (now, list(self.received))
        status = DiagnosticStatus(name=f"{name}: fusion", hardware_id=hardware)
        silent = [STREAM_NAMES[ch] for ch in (IR, VIS) if self.silent[ch]]
        if not active:
            status.level, status.message = DiagnosticStatus.OK, "inactive"
        elif silent:
            status.level, status.message = DiagnosticStatus.WARN, f"{' and '.join(silent)} input silent"
        elif now - self.problem[0] < max(WARN_PERIOD_S, period):
            status.level, status.message = DiagnosticStatus.WARN, self.problem[1]
        elif self.unheard and not self.fused:
            status.level, status.message = DiagnosticStatus.OK, "idle: no subscribers to the outputs"
        else:
            status.level, status.message = DiagnosticStatus.OK, f"fusing {self.fused} pairs"
        info = self.camera_info
        values = {
            "IR rate (Hz)": f"{rates[IR]:.2f}",
            "visible rate (Hz)": f"{rates[VIS]:.2f}",
            "IR images": self.received[IR],
            "visible images": self.received[VIS],
            "bad IR images": self.bad[IR],
            "bad visible images": self.bad[VIS],
            "pairs made": sync.pairs if sync else 0,
            "pairs fused": self.fused,
            "pairs skipped (busy)": self.skipped,
            "pairs not processed (no subscribers)": self.unheard,
            "IR dropped unpaired": sync.dropped[IR] if sync else 0,
            "visible dropped unpaired": sync.dropped[VIS] if sync else 0,
            "synchroniser resets": sync.resets if sync else 0,
            "camera info": (f"{info.width}x{info.height} from {info_topic} ({self.camera_info_count} received)"
                            if info is not None else f"none received on {info_topic}: ~/camera_info not published"),
            "bad camera info": self.bad_camera_info,
            "callback errors": self.errors,
            "latency samples ignored (implausible stamps)": self.latency.ignored,
            "device": hardware,
            "backend": backend,
        }
        for label, samples in (("latency", self.latency), ("processing", self.processing)):
            p = samples.percentiles_ms()
            if p is not None:
                values.update({f"{label} p50 (ms)": f"{p[0]:.1f}", f"{label} p90 (ms)": f"{p[1]:.1f}",
                               f"{label} p99 (ms)": f"{p[2]:.1f}"})
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        return status


class RateLimitedLog:
    """Log each kind of problem at most once per ``WARN_PERIOD_S``; input problems also show in the status.
    ``stats`` is read when called: the node replaces it at each activation."""

    def __init__(self, logger, stats):
        self.logger, self.stats = logger, stats
        self.warned: dict[str, float] = {}

    def warn(self, key: str, text: str, input_problem: bool = True) -> None:
        now = time.monotonic()
        if now - self.warned.get(key, -WARN_PERIOD_S) >= WARN_PERIOD_S:
            self.warned[key] = now
            self.logger.warning(text)
        if input_problem:
            self.stats().problem = (now, text)

    def bad_image(self, channel: int, exc: Exception) -> None:
        """Count and report an image that an input check refused."""
        self.stats().bad[channel] += 1
        text = one_line(exc)
        self.warn(f"bad{channel}:{' '.join(text.split()[:2])}", f"{STREAM_NAMES[channel]} image ignored: {text}")

    def guarded(self, callback):
        """``callback`` made safe for a subscription: any error is counted and logged, never raised."""

        def run(msg) -> None:
            try:
                callback(msg)
            except Exception as exc:  # noqa: BLE001 - nothing a peer sends may stop the node
                self.stats().errors += 1
                self.warn("callback", f"input callback failed: {type(exc).__name__}: {one_line(exc)}")

        return run
