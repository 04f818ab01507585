"""One live progress line on stderr: trials done/failed, front size, best feasible trade-offs,
and an ETA from the measured trial durations."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.tune import Callback

from autocompress.search._pareto import non_dominated

RECENT = 10
"""Trials in the recent-duration window of the ETA."""
MIN_TRIALS_FOR_ETA = 4
"""Trials of this session that must have finished before an ETA is shown (a trend needs a
few points; the first trials of a search are its shortest)."""


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _fmt_bytes(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{int(n)} B"


def _fmt_value(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"


def _fmt_size(values: dict[str, Any]) -> str:
    parts = []
    if isinstance(values.get("size_bytes"), int | float):
        parts.append(_fmt_bytes(values["size_bytes"]))
    if isinstance(values.get("compression_ratio"), int | float):
        parts.append(f"{values['compression_ratio']:.1f}x")
    return ", ".join(parts)


def trial_seconds(durations: Sequence[float], left: int) -> float:
    """Expected seconds per trial for the ``left`` trials still to run, from those done.

    Never below the mean of all trials so far or of the last :data:`RECENT`, and, when trials
    have been getting longer (the search moves towards smaller models that fine-tune longer),
    the least-squares trend carried to the middle of what is left. Early estimates therefore
    err on the long side instead of the 2-4x optimism of "elapsed / done".

    Example:
        >>> trial_seconds([1.0, 1.0, 1.0], 10)
        1.0
        >>> trial_seconds([1.0, 2.0, 3.0, 4.0], 4) > 4.0
        True
    """
    d = np.asarray(durations, dtype=float)
    est = max(float(d.mean()), float(d[-RECENT:].mean()))
    if len(d) >= 4:
        slope, intercept = np.polyfit(np.arange(len(d)), d, 1)
        if slope > 0:
            est = max(est, float(intercept + slope * (len(d) - 1 + (left + 1) / 2)))
    return est


class Progress:
    """Counts finished trials and renders the progress line (no I/O, easy to test).

    The line shows the best feasible value of the objective's first metric (its size and
    compression ratio next to it), the smallest feasible artifact (with its ratio and first
    metric), and an ETA: ``left / workers`` trials of :func:`trial_seconds` each (capped by the
    time budget), shown once :data:`MIN_TRIALS_FOR_ETA` trials of this session have finished.

    Example:
        >>> p = Progress(10, ["accuracy", "size_bytes"], ["maximize", "minimize"], workers=2)
        >>> for acc, size in [(0.9, 1e4), (0.95, 4e4), (0.5, 2e3), (0.85, 5e3)]:
        ...     p.add("COMPLETE", {"accuracy": acc, "size_bytes": size, "duration_s": 4.0,
        ...                        "compression_ratio": 2e5 / size}, feasible=acc > 0.8)
        >>> print(p.line(now=p.start + 9).replace(" | ", "\\n"))
        search: 4/10 trials, 0 failed
        front 3
        best feasible accuracy 0.9500 (40.0 kB, 5.0x)
        smallest feasible 5.0 kB, 40.0x, accuracy 0.8500
        ETA 12s
    """

    def __init__(
        self,
        total: int,
        names: Sequence[str],
        directions: Sequence[str],
        time_budget: float | None = None,
        workers: int = 1,
    ) -> None:
        self.total, self.names, self.directions = total, list(names), list(directions)
        self.time_budget, self.workers = time_budget, max(1, int(workers))
        self.start = time.monotonic()
        self.done = self.failed = self.new = 0
        self.seen: set[str] = set()
        self.points: list[list[float]] = []
        self.best: dict[str, Any] | None = None  # best feasible by the first metric
        self.smallest: dict[str, Any] | None = None  # smallest feasible artifact
        self.durations: list[float] = []

    def add(
        self,
        status: str,
        values: dict[str, Any],
        feasible: bool,
        *,
        resumed: bool = False,
        trial_id: str | None = None,
    ) -> None:
        """Count one finished trial (``resumed``: finished in an earlier session).

        A ``trial_id`` already counted is ignored (a resumed trial reports its record again).
        """
        if trial_id is not None:
            if trial_id in self.seen:
                return
            self.seen.add(trial_id)
        self.done += 1
        self.new += 0 if resumed else 1
        duration = values.get("duration_s")
        if not resumed and isinstance(duration, int | float) and math.isfinite(duration):
            self.durations.append(max(0.0, float(duration)))
        if status != "COMPLETE":
            self.failed += 1
            return
        if feasible and not values.get("duplicate_of"):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self.points.append([float(values[n]) for n in self.names])
            self._track(values)

    def _track(self, values: dict[str, Any]) -> None:
        first, sign = self.names[0], 1.0 if self.directions[0] == "maximize" else -1.0
        v = values.get(first)
        if isinstance(v, int | float) and math.isfinite(v):
            better = self.best is None or sign * v > sign * self.best[first]
            self.best = dict(values) if better else self.best
        size = values.get("size_bytes")
        ok = isinstance(size, int | float) and math.isfinite(size)
        if ok and (self.smallest is None or size < self.smallest["size_bytes"]):
            self.smallest = dict(values)

    def front_size(self) -> int:
        """Size of the feasible front so far."""
        if not self.points:
            return 0
        return int(non_dominated(np.asarray(self.points), self.directions).sum())

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left (None until :data:`MIN_TRIALS_FOR_ETA` trials of this session ended)."""
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if len(self.durations) < MIN_TRIALS_FOR_ETA:
            return None
        eta = math.ceil(left / self.workers) * trial_seconds(self.durations, left)
        if self.time_budget is not None:
            now = time.monotonic() if now is None else now
            eta = min(eta, max(0.0, self.time_budget - (now - self.start)))
        return eta

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The progress line (``final``: the search is over, whatever the count)."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        parts = [
            f"search: {self.done}/{self.total} trials, {self.failed} failed",
            f"front {self.front_size()}",
        ]
        first = self.names[0]
        if self.best is not None:
            size = _fmt_size(self.best)
            parts.append(
                f"best feasible {first} {_fmt_value(self.best[first])}"
                + (f" ({size})" if size else "")
            )
        else:
            parts.append("no feasible trial yet")
        small, best = self.smallest, self.best
        if small and best and small.get("size_bytes") != best.get("size_bytes"):
            value = small.get(first)
            tail = f", {first} {_fmt_value(value)}" if isinstance(value, int | float) else ""
            parts.append(f"smallest feasible {_fmt_size(small)}{tail}")
        left = self.total - self.done
        if left <= 0 or final:
            parts.append(f"done in {_fmt_seconds(elapsed)}")
        else:
            eta = self.eta(now)
            if eta is not None:
                parts.append(f"ETA {_fmt_seconds(eta)}")
        return " | ".join(parts)


def refine_line(
    done: int,
    total: int,
    record: dict[str, Any] | None,
    metric: str,
    elapsed: float,
    workers: int = 1,
    resumed: int = 0,
) -> str:
    """The line printed when the refine stage starts (``record=None``) and each time one of its
    ``total`` fine-tunes ends: what that plan scored, and an ETA from the time the fine-tunes
    of this session took (``workers`` at a time; ``resumed`` of the ``done`` ones finished in
    an earlier session).

    Example:
        >>> rec = {"trial_id": "a_refined", "refined_from": "a", "status": "COMPLETE",
        ...        "feasible": True, "duration_s": 600.0,
        ...        "values": {"accuracy": 0.9927, "size_bytes": 8.85e6, "compression_ratio": 8.48}}
        >>> print(refine_line(1, 4, rec, "accuracy", 610.0, workers=2).replace(" | ", "\\n"))
        refine: 1/4 plans fine-tuned
        a: accuracy 0.9927 (8.85 MB, 8.5x), feasible, in 10m00s
        elapsed 10m10s, ETA 20m20s
    """
    parts = [f"refine: {done}/{total} plans fine-tuned"]
    if record is not None:
        tid = record.get("refined_from") or record.get("trial_id")
        values = record.get("values") or {}
        took = record.get("duration_s")
        took_s = f", in {_fmt_seconds(took)}" if isinstance(took, int | float) else ""
        v = values.get(metric)
        if record.get("status") == "COMPLETE" and isinstance(v, int | float):
            size = _fmt_size(values)
            ok = "feasible" if record.get("feasible") else "infeasible"
            score = f"{metric} {_fmt_value(v)}" + (f" ({size})" if size else "")
            parts.append(f"{tid}: {score}, {ok}{took_s}")
        else:
            parts.append(f"{tid}: {record.get('status')} ({record.get('reason') or 'no reason'})")
    left = total - done
    tail = f"elapsed {_fmt_seconds(elapsed)}"
    if left > 0 and done > resumed:
        per = elapsed / math.ceil((done - resumed) / max(1, workers))
        tail += f", ETA {_fmt_seconds(math.ceil(left / max(1, workers)) * per)}"
    parts.append(tail)
    return " | ".join(parts)


class ProgressCallback(Callback):
    """Tune callback that keeps :class:`Progress` current and redraws the line on stderr.

    On a terminal the line is redrawn in place; otherwise a line is printed at most every
    30 s and at the end. Holds no stream, so it pickles with the experiment for resume.
    """

    def __init__(
        self,
        total: int,
        names: Sequence[str],
        directions: Sequence[str],
        run_dir: str,
        time_budget: float | None = None,
        workers: int = 1,
    ) -> None:
        self.args = (total, list(names), list(directions), time_budget, workers)
        self.run_dir = run_dir
        self.progress = Progress(*self.args)
        self._last_print = 0.0

    def setup(self, **info: Any) -> None:
        from autocompress.search._trial import read_records

        self.progress = Progress(*self.args)
        for tid, rec in read_records(self.run_dir).items():
            values = {**rec.get("values", {}), "duplicate_of": rec.get("duplicate_of")}
            self.progress.add(
                rec["status"], values, rec.get("feasible", False), resumed=True, trial_id=tid
            )
        self._draw()

    def _draw(self, final: bool = False) -> None:
        stream = sys.stderr
        line = self.progress.line(final=final)
        if stream.isatty():
            stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        elif final or time.monotonic() - self._last_print > 30:
            stream.write(line + "\n")
            self._last_print = time.monotonic()
        stream.flush()

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        status = result.get("status")
        if status in ("COMPLETE", "FAILED"):  # each trial reports exactly once
            feasible = bool(result.get("feasible", False))
            self.progress.add(status, result, feasible, trial_id=getattr(trial, "trial_id", None))
            self._draw()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.progress.add("FAILED", {}, False, trial_id=getattr(trial, "trial_id", None))
        self._draw()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._draw(final=True)
