"""Wall-clock helpers shared by the benchmarks (imported from the scripts' own directory)."""

import time

import numpy as np


def seconds(fn):
    """Wall time in seconds of one call `fn()` (e.g. a first call: compilation + run)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn, repeats, warmup=True):
    """Median wall time in seconds of `fn()` over `repeats` calls, after one untimed warm-up
    call unless `warmup` is False (the caller already made and timed the first call)."""
    if warmup:
        fn()
    return float(np.median([seconds(fn) for _ in range(repeats)]))
