"""One live progress line on stderr: trials done/failed, front size, best ratio, ETA."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.tune import Callback

from autocompress.search._pareto import non_dominated


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts finished trials and renders the progress line (no I/O, easy to test).

    Example:
        >>> p = Progress(10, ["accuracy", "size_bytes"], ["maximize", "minimize"])
        >>> p.add("COMPLETE", {"accuracy": 0.9, "size_bytes": 1e4, "compression_ratio": 20.0}, True)
        >>> p.line(now=p.start + 5)
        'search: 1/10 trials, 0 failed | front 1 | best feasible ratio 20.0x | ETA 45s'
    """

    def __init__(
        self,
        total: int,
        names: Sequence[str],
        directions: Sequence[str],
        time_budget: float | None = None,
    ) -> None:
        self.total, self.names, self.directions = total, list(names), list(directions)
        self.time_budget = time_budget
        self.start = time.monotonic()
        self.done = self.failed = self.new = 0
        self.seen: set[str] = set()
        self.points: list[list[float]] = []
        self.best_ratio: float | None = None

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
        if status != "COMPLETE":
            self.failed += 1
            return
        if feasible and not values.get("duplicate_of"):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self.points.append([float(values[n]) for n in self.names])
            ratio = values.get("compression_ratio")
            if isinstance(ratio, int | float) and (
                self.best_ratio is None or ratio > self.best_ratio
            ):
                self.best_ratio = float(ratio)

    def front_size(self) -> int:
        """Size of the feasible front so far."""
        if not self.points:
            return 0
        return int(non_dominated(np.asarray(self.points), self.directions).sum())

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The progress line (``final``: the search is over, whatever the count)."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        parts = [
            f"search: {self.done}/{self.total} trials, {self.failed} failed",
            f"front {self.front_size()}",
        ]
        if self.best_ratio is not None:
            parts.append(f"best feasible ratio {self.best_ratio:.1f}x")
        else:
            parts.append("no feasible trial yet")
        left = self.total - self.done
        if left <= 0 or final:
            parts.append(f"done in {_fmt_seconds(elapsed)}")
        elif self.new > 0:
            eta = elapsed / self.new * left
            if self.time_budget is not None:
                eta = min(eta, max(0.0, self.time_budget - elapsed))
            parts.append(f"ETA {_fmt_seconds(eta)}")
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
    ) -> None:
        self.args = (total, list(names), list(directions), time_budget)
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
