"""What the report shows, derived once from a run directory's files (no Ray, no torch)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autocompress.errors import AutocompressError

_DROP = re.compile(r"^\s*(?P<metric>\w+)_drop\s*<=\s*(?P<limit>[0-9.eE+-]+)\s*$")


@dataclass
class RunView:
    """A finished run as the report sees it.

    Args:
        run_dir: the run directory.
        task: the task's name (from ``run.json``), or the directory name.
        metric: the task's quality metric (``accuracy`` for the built-ins).
        trials: ``trials.csv``, one row per trial in finish order.
        pareto: ``pareto.csv``, the feasible front on val with ``test_*`` metrics.
        teacher: size and val/test metrics of the teacher.
        objective: metrics (name, direction), constraints, weights.
        info: the rest of ``result.json`` (settings, counts, wall time).
        layers: every compressible layer of the space, in order.
        progress: per finished trial: ``n_trials``, ``trial_id``, ``hypervolume``,
            ``best_ratio`` and ``best_metric`` (best feasible so far).
    """

    run_dir: Path
    task: str
    metric: str
    trials: pd.DataFrame
    pareto: pd.DataFrame
    teacher: dict[str, Any]
    objective: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    progress: pd.DataFrame = field(default_factory=pd.DataFrame)

    # --- derived -------------------------------------------------------------------------
    def count(self, status: str) -> int:
        """Trials with ``status`` (``COMPLETE``, ``FAILED``, ``STOPPED``)."""
        return int((self.trials["status"] == status).sum()) if len(self.trials) else 0

    @property
    def n_feasible(self) -> int:
        """Complete trials that meet every constraint."""
        return int(self.complete["feasible"].astype(bool).sum())

    @property
    def n_duplicates(self) -> int:
        """Trials that reused the result of an identical plan (not run again)."""
        return int((self.trials.get("duplicate_of", pd.Series(dtype=str)) != "").sum())

    @property
    def complete(self) -> pd.DataFrame:
        """Complete trials that ran (duplicates of a plan already run are left out)."""
        t = self.trials
        if not len(t):
            return t
        own = t["duplicate_of"] == "" if "duplicate_of" in t else True
        return t[(t["status"] == "COMPLETE") & own]

    @property
    def failures(self) -> pd.DataFrame:
        """Trials that did not finish (FAILED or STOPPED) with their reasons."""
        t = self.trials
        return t[t["status"] != "COMPLETE"] if len(t) else t

    @property
    def names(self) -> list[str]:
        """The objective's metric names."""
        return [m["name"] for m in self.objective.get("metrics", [])]

    @property
    def teacher_size(self) -> float:
        """The teacher artifact's bytes (the reference of every compression ratio)."""
        return float(self.teacher.get("size_bytes", np.nan))

    def teacher_metric(self, split: str = "val", name: str | None = None) -> float:
        """The teacher's value of ``name`` (default: the task metric) on ``split``."""
        return float(self.teacher.get(split, {}).get(name or self.metric, np.nan))

    def drop_limit(self) -> float | None:
        """The largest allowed ``<metric>_drop`` of the constraints, if one is set."""
        for c in self.objective.get("constraints", []):
            m = _DROP.match(str(c))
            if m and m["metric"] == self.metric:
                return float(m["limit"])
        return None

    def latency_column(self) -> str | None:
        """The measured latency column (an objective's ``latency_ms*`` first), if any."""
        cands = [n for n in self.names if n.startswith("latency_ms")]
        cands += [c for c in self.trials.columns if c.startswith("latency_ms") and "iqr" not in c]
        for c in cands:
            if c in self.trials and self.complete[c].notna().any():
                return c
        return None


def _run_json(run: Path) -> dict[str, Any]:
    try:
        d = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _progress(trials: pd.DataFrame, hv: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Hypervolume and the best feasible ratio / metric after each finished trial."""
    t = trials[trials["status"].isin(["COMPLETE", "FAILED"])]
    ok = (t["status"] == "COMPLETE") & t["feasible"].astype(bool)
    out = hv.copy()
    for col, src in (("best_ratio", "compression_ratio"), ("best_metric", metric)):
        vals = pd.to_numeric(t[src], errors="coerce") if src in t else pd.Series(np.nan, t.index)
        out[col] = vals.where(ok).cummax().ffill().to_numpy()
    return out


def load_run(run_dir: str | Path) -> RunView:
    """Read a finished run directory for the report.

    Example:
        >>> load_run("no/such/run")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        autocompress.errors.AutocompressError: no finished search in 'no/such/run' ...
    """
    run = Path(run_dir)
    if not (run / "trials.csv").is_file():
        raise AutocompressError(
            f"no finished search in {str(run)!r} (trials.csv missing): run `autocompress run` first"
        )
    from autocompress.search import SearchResult

    res = SearchResult.load(run)
    meta = _run_json(run)
    task = meta.get("task", {}) if isinstance(meta.get("task"), dict) else {}
    names = res.names
    metric = task.get("metric_name") or ("accuracy" if "accuracy" in res.trials else None)
    if metric is None:
        metric = next(
            (n for n, d in zip(names, res.directions, strict=True) if d == "maximize"), ""
        )
    trials = res.trials
    try:
        hv = res.hypervolume_history()
    except (KeyError, ValueError):  # an objective whose metrics never got a value
        hv = pd.DataFrame({"n_trials": [], "trial_id": [], "hypervolume": []})
    return RunView(
        run_dir=run,
        task=str(task.get("name") or run.name),
        metric=metric,
        trials=trials,
        pareto=res.pareto,
        teacher=dict(res.teacher),
        objective=dict(res.objective),
        info=dict(res.info, message=res.message),
        layers=list(meta.get("space", {}).get("layers", [])),
        progress=_progress(trials, hv, metric) if len(trials) else hv,
    )
