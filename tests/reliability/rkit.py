"""Fault-injection helpers: real subprocesses, real signals, invariants read from the run dir.

Only processes started by these tests are ever signalled: a driver subprocess runs in its own
session, its descendants are collected from /proc while it runs (so orphans left by a SIGKILL
are known by PID), and exactly those PIDs are killed afterwards (``tests/raykit.py``, shared with
``tests/search``). Ray is never stopped globally.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from raykit import descendants, kill_pids

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TALLY = {"faults injected": 0, "runs resumed": 0, "bad inputs tried": 0, "trials lost": 0}


# --- processes -------------------------------------------------------------------------------
def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def cli() -> list[str]:
    """The ``autocompress`` console script of this environment."""
    script = Path(sys.executable).with_name("autocompress")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "autocompress.cli"]


def env(**extra: str) -> dict[str, str]:
    """Environment for a driver subprocess: quiet Ray, tests/reliability importable."""
    e = dict(os.environ)
    e.update(RAY_AUTH_MODE="disabled", RAY_AIR_NEW_OUTPUT="0", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), e.get("PYTHONPATH")) if p)
    e.update(extra)
    return e


class Driver:
    """``autocompress run`` in a subprocess, with every process it starts tracked by PID."""

    def __init__(self, args: list[str], log: Path, cwd: Path | None = None, **env_extra: str):
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env(**env_extra),
            cwd=cwd or ROOT,
        )
        self.pids: set[int] = set()

    def track(self) -> bool:
        """Remember the current descendants; True while the driver is alive."""
        if self.proc.poll() is None:
            self.pids.update(descendants(self.proc.pid))
        return self.proc.poll() is None

    def poll_until(self, cond: Callable[[], Any], timeout: float, what: str, dt: float = 0.05):
        """Poll ``cond`` (tracking descendants) until it is truthy or the driver exits."""

        def check() -> Any:
            alive = self.track()
            got = cond()
            if got:
                return got
            if not alive:
                raise AssertionError(
                    f"driver exited ({self.proc.returncode}) before {what}:\n"
                    f"{self.output()[-3000:]}"
                )
            return None

        return wait_for(check, timeout, what, interval=dt)

    def signal(self, sig: int) -> None:
        self.track()
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(
                f"driver still running after {timeout:.0f}s:\n{self.output()[-3000:]}"
            ) from None

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        """Kill the driver and every process it started (orphans included)."""
        self.track()
        kill_pids({self.proc.pid, *self.pids})
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self._out.close()


# --- experiments -----------------------------------------------------------------------------
def write_experiment(path: Path, *, trials: int, epochs: int = 3, **search: Any) -> Path:
    """A small digits-mlp experiment (tied-free, three knobs per layer)."""
    exp = {
        "task": "digits-mlp",
        "space": {"knobs": {"sparsity": [0.5, 0.95], "bits": [2, 4, 8]}},
        "finetune": {"epochs": epochs, "patience": max(1, epochs)},
        "objective": {"metrics": ["accuracy", "size_bytes"], "constraints": []},
        "search": {"trials": trials, "workers": 2, "seed": 0, **search},
    }
    path.write_text(yaml.safe_dump(exp))
    return path


def records(rd: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in (rd / "records").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            out[p.stem] = json.loads(p.read_text())
    return out


def artifact_hashes(rd: Path) -> dict[str, str]:
    """``{trial_id: manifest text}`` of every complete trial artifact in ``trials/``/``pareto/``."""
    out = {}
    for sub in ("trials", "pareto"):
        for m in (rd / sub).glob("*/manifest.json"):
            out[m.parent.name] = m.read_text()
    return out


def brute_front(trials: pd.DataFrame, names: list[str], directions: list[str]) -> set[str]:
    ok = trials[
        (trials["status"] == "COMPLETE")
        & trials["feasible"].astype(bool)
        & (trials["duplicate_of"] == "")
    ]
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    rows = [
        (r["trial_id"], np.array([r[n] for n in names], dtype=float) * signs)
        for _, r in ok.iterrows()
    ]
    return {tid for tid, a in rows if not any((b <= a).all() and (b < a).any() for _, b in rows)}


def check_run(
    rd: Path,
    budget: int,
    before: dict[str, dict[str, Any]] | None = None,
    arts_before: dict[str, str] | None = None,
) -> dict[str, int]:
    """Assert the invariants of a finished (possibly resumed) run; return counts.

    * the trials table has exactly ``budget`` unique trials, each COMPLETE or FAILED;
    * every record on disk is a row, and every row is its record (nothing lost or added);
    * trials finished before a kill are kept exactly (same finish time and values: not rerun);
    * the front equals the front recomputed from ``trials.csv``;
    * front artifacts load (sha256 verified); artifacts written before the kill are unchanged;
    * no temporary file is left in autocompress' own files.
    """
    from autocompress.artifacts import load
    from autocompress.search import SearchResult

    res = SearchResult.load(rd)
    t = res.trials
    assert len(t) == budget, t[["trial_id", "status", "reason"]]
    assert t["trial_id"].is_unique
    assert t["status"].isin(["COMPLETE", "FAILED"]).all(), t[["trial_id", "status", "reason"]]
    recs = records(rd)
    assert set(recs) == set(t["trial_id"]), (sorted(recs), sorted(t["trial_id"]))
    assert not list((rd / "records" / "adopt").glob("[!.]*.json")), "finished trials not adopted"
    final_id = {r.get("adopted_from") or tid: tid for tid, r in recs.items()}
    lost = kept = 0
    for tid, rec in (before or {}).items():
        if rec.get("status") not in ("COMPLETE", "FAILED"):
            continue
        rows = t[t["trial_id"] == final_id.get(tid, tid)]
        if rows.empty:
            lost += 0 if rec.get("duplicate_of") else 1  # a lost duplicate is no lost work
            continue
        kept += 1
        row = rows.iloc[0]
        assert row["status"] == rec["status"]
        assert abs(row["finished_at"] - rec["finished_at"]) < 1e-3, f"trial {tid} ran again"
        if rec["status"] == "COMPLETE":
            assert row["accuracy"] == rec["values"]["accuracy"]
    TALLY["trials lost"] += lost
    assert lost == 0, f"{lost} finished trials lost"
    assert set(res.pareto["trial_id"]) == brute_front(t, res.names, res.directions)
    for tid in res.pareto["trial_id"]:
        load(res.artifact_path(tid))  # verifies every sha256
    after = artifact_hashes(rd)
    for tid, manifest in (arts_before or {}).items():
        now = after.get(tid) or after.get(final_id.get(tid, tid))
        if now is not None:
            assert now == manifest, f"artifact of {tid} was rewritten"
    leftovers = [
        p for sub in ("records", "trials", "pareto", "teacher") for p in (rd / sub).rglob(".*")
    ] + list(rd.glob(".*tmp"))
    assert not leftovers, leftovers
    return {
        "trials": len(t),
        "kept": kept,
        "front": len(res.pareto),
    }
