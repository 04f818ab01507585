"""The trial function Ray Tune runs: plan -> compressed model -> artifact -> metrics.

Every trial writes one JSON record, ``run_dir/records/<trial_id>.json`` (status, failure reason,
plan, metrics, constraint values, timing), before it reports to Tune. The record is what the
trials table is built from, what a duplicate plan reuses, and what a trial restarted by a
resume finds if it had already finished before the driver was killed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autocompress.objectives import Objective, Reference
from autocompress.search._common import CONSTRAINT_PREFIX
from autocompress.tasks import Task

FINISHED = ("COMPLETE", "FAILED")


@dataclass(frozen=True)
class TrialSettings:
    """What every trial needs besides the task and objective (all plain data)."""

    run_dir: str
    cpus_per_trial: float = 1.0
    trial_timeout: float | None = None
    reference: Reference = Reference()
    seed: int = 0
    device: str = "cpu"


class TrialFailure(RuntimeError):
    """A candidate that cannot be scored (non-finite metric, timeout)."""


def record_path(run_dir: str | Path, trial_id: str) -> Path:
    """Where trial ``trial_id``'s record lives."""
    return Path(run_dir) / "records" / f"{trial_id}.json"


def read_record(run_dir: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The record of ``trial_id``, or None if there is none (or it is unreadable)."""
    try:
        return json.loads(record_path(run_dir, trial_id).read_text())
    except (OSError, ValueError):
        return None


def read_records(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every readable record in ``run_dir``, by trial id."""
    out = {}
    for p in sorted((Path(run_dir) / "records").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        out[rec.get("trial_id", p.stem)] = rec
    return out


def write_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Atomically write a record (temp file + rename)."""
    path = record_path(run_dir, record["trial_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True, allow_nan=True))
    os.replace(tmp, path)


def report_of(record: dict[str, Any], search_metrics: list[str]) -> dict[str, Any]:
    """The flat dict reported to Tune: metrics only for COMPLETE trials, never NaN.

    A failed trial reports the searcher's metrics as None: Tune insists on the keys, and
    :class:`ConstrainedOptunaSearch` tells Optuna FAIL from ``status``.
    """
    out: dict[str, Any] = {
        "status": record["status"],
        "reason": record.get("reason") or "",
        "plan_json": record["plan_json"],
        "duplicate_of": record.get("duplicate_of") or "",
        "duration_s": float(record.get("duration_s") or 0.0),
    }
    if record["status"] == "COMPLETE":
        out.update({k: float(v) for k, v in record["values"].items()})
        for i, v in enumerate(record["constraints"]):
            out[f"{CONSTRAINT_PREFIX}{i}"] = float(v)
        out["feasible"] = bool(record["feasible"])
        out["violation"] = float(record["violation"])
    else:
        out.update({name: None for name in search_metrics})
    return out


_WARM = False


def _warm_up() -> None:
    """Pay torch's one-off lazy initialization (about 1 s) before a trial's clock starts."""
    global _WARM
    if _WARM:
        return
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    lin(torch.zeros(1, 2)).sum().backward()
    opt.step()
    _WARM = True


def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"[:500]


def evaluate_plan(
    plan_json: str,
    trial_id: str,
    task: Task,
    objective: Objective,
    settings: TrialSettings,
) -> dict[str, Any]:
    """Compress, export and score one plan; always returns a record, COMPLETE or FAILED.

    ``trial_timeout`` is the fine-tune deadline (the best epoch so far is kept); a trial that
    still takes more than 1.5 x ``trial_timeout`` + 1 s in total is recorded as FAILED.
    """
    from autocompress import compress
    from autocompress.artifacts import export, write_metrics
    from autocompress.spaces import Plan

    _warm_up()
    start, started_at = time.monotonic(), time.time()
    timeout = settings.trial_timeout
    run_dir = Path(settings.run_dir)
    art_dir = run_dir / "trials" / trial_id
    rec: dict[str, Any] = {
        "trial_id": trial_id,
        "plan_json": plan_json,
        "status": "FAILED",
        "reason": "",
        "values": {},
        "constraints": [],
        "feasible": False,
        "violation": math.inf,
        "artifact": None,
        "duplicate_of": None,
        "started_at": started_at,
        "host": socket.gethostname(),
    }

    def check_time(step: str) -> None:
        if timeout is not None and time.monotonic() - start > 1.5 * timeout + 1.0:
            took = time.monotonic() - start
            raise TrialFailure(f"{step} ended after {took:.1f}s, over trial_timeout={timeout}s")

    try:
        plan = Plan.from_json(plan_json)
        deadline = start + timeout if timeout is not None else None
        model = compress.apply(
            task.teacher(),
            plan,
            task,
            seed=settings.seed,
            deadline=deadline,
            device=settings.device,
        )
        check_time("compression")
        shutil.rmtree(art_dir, ignore_errors=True)  # left by an attempt before a restart
        art = export(model, plan, art_dir, task_spec=task.spec)
        values = objective.evaluate(model, art, task, "val", settings.reference)
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            name = next(iter(bad))
            raise TrialFailure(f"metric {name!r} is {bad[name]}: the candidate cannot be scored")
        check_time("evaluation")
        cv = objective.constraint_values(values)
        write_metrics(art_dir, values)
        rec.update(
            status="COMPLETE",
            values=values,
            constraints=cv,
            feasible=all(v <= 0 for v in cv),
            violation=float(sum(max(v, 0.0) for v in cv)),
            artifact=f"trials/{trial_id}",
        )
    except Exception as exc:  # recorded, never raised: a broken candidate is a result
        rec["reason"] = _reason(exc)
        shutil.rmtree(art_dir, ignore_errors=True)
    rec["duration_s"] = time.monotonic() - start
    rec["finished_at"] = time.time()
    return rec


def run_trial(
    config: dict[str, Any], *, task: Task, objective: Objective, settings: TrialSettings
) -> None:
    """Ray Tune function trainable: one plan, one record, one report."""
    from ray import tune

    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id()
    names = objective.search_metrics[0]
    plan_json = config["plan_json"]
    old = read_record(settings.run_dir, trial_id)
    if old and old.get("plan_json") == plan_json and old.get("status") in FINISHED:
        tune.report(report_of(old, names))  # finished before the driver was killed: keep it
        return
    dup = config.get("duplicate_of")
    orig = read_record(settings.run_dir, dup) if dup else None
    if orig and orig.get("plan_json") == plan_json and orig.get("status") in FINISHED:
        now = time.time()
        rec = {**orig, "trial_id": trial_id, "duplicate_of": dup, "duration_s": 0.0}
        rec.update(started_at=now, finished_at=now, host=socket.gethostname())
    else:
        rec = evaluate_plan(plan_json, trial_id, task, objective, settings)
    write_record(settings.run_dir, rec)
    tune.report(report_of(rec, names))
