"""Timing helpers the benchmarks share (no pytest here)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def per_call(fn: Callable[[], Any], n: int, rounds: int = 5) -> float:
    """Median over `rounds` of the mean seconds per call of `fn` over `n` calls (after one warm-up call)."""
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n)
    return statistics.median(out)
