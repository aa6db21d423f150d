"""Timing helpers for ``ivf bench``: warm-up, interleaved repetitions, median and p99, CUDA events, peak memory."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


@dataclass
class Timing:
    """Wall-clock (CPU) or CUDA-event (GPU) times of one measured function, in milliseconds."""

    times_ms: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.times_ms, 99))

    @property
    def fps(self) -> float:
        return 1000.0 / self.p50

    def summary(self) -> dict:
        return {"p50_ms": round(self.p50, 3), "p99_ms": round(self.p99, 3),
                "mean_ms": round(float(np.mean(self.times_ms)), 3), "min_ms": round(min(self.times_ms), 3),
                "fps": round(self.fps, 2), "reps": len(self.times_ms)}


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def time_interleaved(functions: dict[str, tuple[Callable[[], object], int]], warmup: int = 3,
                     device: torch.device = torch.device("cpu")) -> dict[str, Timing]:
    """Time several functions round-robin so that load from other processes hits them alike.

    ``functions`` maps a name to ``(fn, reps)``; each runs ``warmup`` times untimed, then its ``reps`` timed calls
    are spread evenly over the rounds of the longest one.
    """
    for fn, _ in functions.values():
        for _ in range(warmup):
            fn()
    rounds = max(reps for _, reps in functions.values())
    timings = {name: Timing() for name in functions}
    for r in range(rounds):
        for name, (fn, reps) in functions.items():
            if r * reps // rounds != (r + 1) * reps // rounds:  # this function's share of the rounds
                timings[name].times_ms.append(_timed(fn, device))
    return timings


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by torch since the last reset, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
