"""Wall-clock timing for the benchmarks (no jax, no torch: both bench processes use it)."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Seconds of `fn()`: one untimed call (compiles, warms allocators and lazy
    initialization), then the median of `repeats` timed calls."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
