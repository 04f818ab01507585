"""Interleaved latency measurement: warm-up, round-robin repeats, median with spread.

Timing candidates one after the other lets a burst of machine noise (another process, a frequency
change) land on one of them only, which corrupts their ratio. Here every round times each
candidate once, in a rotating order, so noise hits all of them alike and a ratio computed per
round (:func:`paired_ratio`) cancels most of it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from autocompress.errors import AutocompressError


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one candidate, per call.

    Args:
        median_ms: median over the repeats, in milliseconds.
        iqr_ms: interquartile range (p75 - p25) over the repeats, in milliseconds.
        cv: coefficient of variation (standard deviation / mean) over the repeats.
        repeats: number of timed samples.
        number: calls per sample (small calls are looped so a sample lasts >= ``min_sample_ms``).
        samples_ms: the per-call time of every sample, in round order.
    """

    median_ms: float
    iqr_ms: float
    cv: float
    repeats: int
    number: int = 1
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_samples(cls, samples_ms: list[float], number: int = 1) -> LatencyStats:
        """Statistics of per-call times ``samples_ms``.

        Example:
            >>> LatencyStats.from_samples([1.0, 2.0, 3.0, 4.0]).median_ms
            2.5
        """
        a = np.asarray(samples_ms, dtype=np.float64)
        p25, p50, p75 = np.percentile(a, [25, 50, 75])
        cv = float(a.std(ddof=1) / a.mean()) if len(a) > 1 and a.mean() > 0 else 0.0
        return cls(float(p50), float(p75 - p25), cv, len(a), number, tuple(map(float, a)))


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block (``None``: leave it) and stop the GC."""
    before = torch.get_num_threads()
    gc_was_on = gc.isenabled()
    if threads is not None:
        torch.set_num_threads(threads)
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if gc_was_on:
            gc.enable()
        if threads is not None:
            torch.set_num_threads(before)


def _calibrate(fn: Callable[[Any], Any], inputs: Any, min_sample_ms: float, cap: int) -> int:
    """Calls per sample so one sample lasts at least ``min_sample_ms`` (timeit's autorange)."""
    number = 1
    while number < cap:
        t0 = time.perf_counter()
        for _ in range(number):
            fn(inputs)
        if (time.perf_counter() - t0) * 1e3 >= min_sample_ms:
            break
        number = min(cap, number * 4)
    return number


def measure_latency(
    candidates: Mapping[str, Callable[[Any], Any]],
    inputs: Any,
    *,
    warmup: int = 3,
    repeats: int = 25,
    min_sample_ms: float = 1.0,
    threads: int | None = 1,
    max_seconds: float | None = None,
    max_number: int = 10_000,
) -> dict[str, LatencyStats]:
    """Time every callable on ``inputs``, interleaved round robin, and summarize per call.

    Each candidate is called as ``fn(inputs)``. First ``warmup`` rounds untimed, then the number
    of calls per sample is calibrated per candidate, then ``repeats`` rounds each time every
    candidate once (order rotated every round). Garbage collection is off while timing.

    Args:
        candidates: name -> callable taking ``inputs``.
        inputs: passed as is (a tensor for torch modules, an array for ``OnnxModel.run_numpy``).
        warmup: untimed rounds before calibration.
        repeats: timed rounds (samples per candidate).
        min_sample_ms: loop a call until one sample lasts this long (timer resolution).
        threads: torch intra-op threads during the measurement (``None`` leaves it); ONNX Runtime
            sessions carry their own, see :class:`OnnxModel`.
        max_seconds: stop after this wall time once at least 5 rounds are done (``None``: never).
        max_number: upper bound on calls per sample.

    Example:
        >>> work = {"small": lambda n: sum(range(n)), "large": lambda n: sum(range(20 * n))}
        >>> stats = measure_latency(work, 2000, repeats=5, min_sample_ms=0.2)
        >>> stats["small"].median_ms < stats["large"].median_ms, stats["large"].repeats
        (True, 5)
    """
    if not candidates or not all(callable(f) for f in candidates.values()):
        raise AutocompressError("candidates must be a non-empty dict of name -> callable")
    if not (isinstance(repeats, int) and repeats >= 1 and isinstance(warmup, int) and warmup >= 0):
        raise AutocompressError(f"repeats={repeats!r} must be >= 1 and warmup={warmup!r} >= 0")
    names = list(candidates)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with pinned_threads(threads):
        for _ in range(warmup):
            for n in names:
                candidates[n](inputs)
        number = {n: _calibrate(candidates[n], inputs, min_sample_ms, max_number) for n in names}
        start = time.perf_counter()
        for r in range(repeats):
            for k in range(len(names)):
                n = names[(r + k) % len(names)]
                fn, m = candidates[n], number[n]
                t0 = time.perf_counter_ns()
                for _ in range(m):
                    fn(inputs)
                samples[n].append((time.perf_counter_ns() - t0) / 1e6 / m)
            over = max_seconds is not None and time.perf_counter() - start > max_seconds
            if over and r + 1 >= min(5, repeats):
                break
    return {n: LatencyStats.from_samples(samples[n], number[n]) for n in names}


def paired_ratio(num: LatencyStats, den: LatencyStats) -> tuple[float, float]:
    """Median and IQR of the per-round ratios ``num / den`` of two interleaved measurements.

    Rounds are paired (same moment, same machine state), so the ratio cancels slow drifts that
    a ratio of medians would keep.

    Example:
        >>> a = LatencyStats.from_samples([2.0, 4.0, 2.0])
        >>> b = LatencyStats.from_samples([1.0, 2.0, 1.0])
        >>> paired_ratio(a, b)
        (2.0, 0.0)
    """
    n = min(len(num.samples_ms), len(den.samples_ms))
    if n == 0:
        return (num.median_ms / den.median_ms if den.median_ms else math.inf), 0.0
    r = np.asarray(num.samples_ms[:n]) / np.maximum(np.asarray(den.samples_ms[:n]), 1e-12)
    p25, p50, p75 = np.percentile(r, [25, 50, 75])
    return float(p50), float(p75 - p25)
