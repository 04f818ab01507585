"""After the search: trials table, Pareto front on test, artifacts kept, files written."""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from autocompress.objectives import Objective, Reference
from autocompress.search._result import RESULT_VERSION, SearchResult
from autocompress.search._tables import closest_trial, front_mask, trial_rows, write_csv
from autocompress.search._trial import read_records
from autocompress.tasks import Task


def _artifact_dir(run_dir: Path, trial_id: str, recorded: str = "") -> Path | None:
    """Where a trial's artifact is: ``pareto/<id>``, its recorded directory, or ``trials/<id>``.

    An adopted trial (see ``_trial.adopt``) keeps the directory it was written to.
    """
    places = [run_dir / "pareto" / trial_id, run_dir / "trials" / trial_id]
    if recorded:
        places.insert(1, run_dir / recorded)
    return next((p for p in places if (p / "manifest.json").is_file()), None)


def _test_metrics(
    run_dir: Path,
    trial_id: str,
    recorded: str,
    task: Task,
    objective: Objective,
    reference: Reference,
) -> dict[str, float]:
    """Reload the artifact from disk and score it on the test split (proves it is real)."""
    from autocompress.artifacts import Artifact, load

    path = _artifact_dir(run_dir, trial_id, recorded)
    if path is None:
        return {"test_error": "artifact not found"}
    try:
        model = load(path, model=task.build_model(), example_input=task.example_input())
        values = objective.evaluate(model, Artifact.open(path), task, "test", reference)
    except Exception as e:  # reported in the table; one bad artifact must not lose the run
        warnings.warn(f"trial {trial_id}: test evaluation failed: {e}", stacklevel=2)
        return {"test_error": f"{type(e).__name__}: {e}"[:500]}
    return {f"test_{k}": v for k, v in values.items()}


def _remove_temporaries(run_dir: Path) -> None:
    """Delete temporary files and directories left by writes a SIGKILL interrupted.

    Every write of autocompress goes to a hidden temporary name and is renamed into place, so
    a leftover is never valid; ``tune/`` is Tune's own and left alone.
    """
    for sub in ("records", "trials", "pareto", "teacher"):
        base = run_dir / sub
        if not base.is_dir():
            continue
        for p in sorted(base.rglob(".*"), reverse=True):
            if p.name.startswith(".claim-"):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    for p in run_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def _keep_artifacts(
    run_dir: Path, df: pd.DataFrame, front: list[str], keep: str, interrupted: bool
) -> None:
    """Move/copy front artifacts to ``pareto/``, delete the rest as ``keep`` says.

    After an interrupt nothing is moved or deleted (the resumed run still needs its artifacts);
    the table points at where each artifact is. Re-running this after a kill is safe: copies go
    through a temporary directory, and ``pareto/`` entries no longer on the front are removed.
    """
    pareto_dir = run_dir / "pareto"
    recorded = dict(zip(df["trial_id"], df["artifact"], strict=True))
    if interrupted:
        df["artifact"] = [
            str(p.relative_to(run_dir)) if (p := _artifact_dir(run_dir, t, recorded[t])) else ""
            for t in df["trial_id"]
        ]
        return
    if keep != "none":
        for tid in front:
            src, dst = _artifact_dir(run_dir, tid, recorded.get(tid, "")), pareto_dir / tid
            if dst.exists() or src is None:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if keep == "all":
                tmp = pareto_dir / f".{tid}.copy"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                tmp.rename(dst)
            else:
                src.rename(dst)
        if pareto_dir.is_dir():
            for p in pareto_dir.iterdir():  # front members of an earlier, interrupted finalize
                if p.name not in front:
                    shutil.rmtree(p, ignore_errors=True)
    if keep in ("pareto", "none"):
        shutil.rmtree(run_dir / "trials", ignore_errors=True)
    if keep == "none":
        shutil.rmtree(pareto_dir, ignore_errors=True)
    in_front = df["trial_id"].isin(front)
    if keep == "pareto":
        df["artifact"] = [
            f"pareto/{t}" if f else "" for t, f in zip(df["trial_id"], in_front, strict=True)
        ]
    elif keep == "none":
        df["artifact"] = ""


def _message(df: pd.DataFrame, objective: Objective) -> tuple[str | None, dict[str, Any] | None]:
    """Why the front is empty, naming the closest trial; (None, None) if it is not."""
    if df.empty:
        return "no trial ran: raise trials or time_budget", None
    done = df[df["status"] == "COMPLETE"]
    if done.empty:
        first = df[df["reason"] != ""]
        why = f" (first failure, trial {first.iloc[0]['trial_id']}: {first.iloc[0]['reason']})"
        return "no trial finished" + (why if len(first) else "") + ": see trials.csv", None
    if done["feasible"].astype(bool).any():
        return None, None
    closest = closest_trial(df)
    assert closest is not None
    row = df[df["trial_id"] == closest["trial_id"]].iloc[0]
    broken = []
    for c in objective.constraints:
        v = row.get(c.metric, math.nan)
        if not c.satisfied({c.metric: v}):
            broken.append(f"{c.metric}={v:.6g} violates {c}")
    closest["violated"] = broken
    msg = (
        f"no trial satisfies the constraints {[str(c) for c in objective.constraints]}; "
        f"closest is trial {closest['trial_id']} ({'; '.join(broken)}): relax the constraints, "
        "widen the space or run more trials"
    )
    return msg, closest


def finalize(
    run_dir: Path,
    tune_trials: Mapping[str, Mapping[str, Any]],
    task: Task,
    objective: Objective,
    reference: Reference,
    teacher: dict[str, Any],
    settings: dict[str, Any],
    wall_time_s: float,
    interrupted: bool = False,
    unadopted: int = 0,
    fetch: Callable[[str, str], None] | None = None,
) -> SearchResult:
    """Build and write ``trials.csv``, ``pareto.csv`` and ``result.json``; return the result.

    ``interrupted``: the search was stopped (Ctrl-C / SIGTERM) before its budget; the tables
    hold the trials so far and the message says how to resume. ``fetch(trial_id, recorded)``
    brings a front member's artifact into ``run_dir`` first (a run on object storage).
    """
    _remove_temporaries(run_dir)
    records = read_records(run_dir)
    df = trial_rows(tune_trials, records, objective.names)
    mask = front_mask(df, objective.names, objective.directions)
    front = df.loc[mask, "trial_id"].astype(str).tolist() if len(df) else []
    recorded = dict(zip(df["trial_id"], df["artifact"], strict=True)) if len(df) else {}
    for t in front if fetch is not None else ():
        fetch(t, recorded.get(t, ""))
    tests = {
        t: _test_metrics(run_dir, t, recorded.get(t, ""), task, objective, reference) for t in front
    }
    keep = settings.get("keep_artifacts", "pareto")
    if len(df):
        _keep_artifacts(run_dir, df, front, keep, interrupted)
    pareto = df[mask].copy() if len(df) else df.copy()
    if len(pareto):
        test_df = pd.DataFrame([tests[t] for t in front], index=pareto.index)
        pareto = pd.concat([pareto, test_df], axis=1)
        if interrupted:
            pass  # the artifact column already says where each one is
        else:
            pareto["artifact"] = "" if keep == "none" else [f"pareto/{t}" for t in front]
        first = objective.metrics[0]
        pareto = pareto.sort_values(
            first.name, ascending=first.direction == "minimize", kind="stable"
        )
    message, closest = _message(df, objective)
    if interrupted:
        done = int(df["status"].isin(["COMPLETE", "FAILED"]).sum()) if len(df) else 0
        message = (
            f"interrupted after {done} of {settings.get('trials')} trials; the results so far "
            "are saved: resume with --resume (search.run(..., resume=True)) to finish"
        ) + (f" ({message})" if message else "")
    trials = write_csv(df, run_dir / "trials.csv")
    pareto = write_csv(pareto, run_dir / "pareto.csv")
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    info = {
        "_type": "autocompress-result",
        "_version": RESULT_VERSION,
        "objective": objective.describe(),
        "teacher": teacher,
        "message": message,
        "closest": closest,
        "front": front,
        "counts": {str(k): int(v) for k, v in counts.items()},
        "interrupted": interrupted,
        "unadopted": unadopted,
        "n_feasible": int(trials["feasible"].astype(bool).sum()) if len(trials) else 0,
        "settings": settings,
        "wall_time_s": wall_time_s,
        "finished_at": time.time(),
    }
    tmp = run_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    tmp.replace(run_dir / "result.json")
    return SearchResult.load(run_dir)
