"""Build (or restore) the Ray Tune experiment and run it.

Resume has two paths. When Tune's saved state in ``run_dir/tune`` is complete, the experiment
is restored with ``Tuner.restore`` (trial ids, searcher and sampler state kept; this is the one
place anything under ``run_dir`` is unpickled, by Tune, from the files Tune wrote). Finished
records that the saved state does not know (trials started after Tune's last save) are put up
for adoption and enqueued in the Optuna study, so the same plans are proposed again and adopted
instead of recomputed. When the saved state is missing or damaged (the driver was killed before
Tune's first save, or while Tune was writing it), a new experiment starts from the Optuna
parameters of every finished record, each adopted the same way: no finished trial is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickletools
import shutil
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from autocompress.objectives import Objective, Reference
from autocompress.search._common import STUDY_FILE, STUDY_NAME
from autocompress.search._early import EarlyStop
from autocompress.search._journal import study_storage
from autocompress.search._storage import Remote, is_uri
from autocompress.search._trial import (
    ADOPT,
    Shipment,
    TrialSettings,
    guarded_evaluate,
    plan_key,
    read_record,
    read_records,
    record_path,
    run_trial,
    write_record,
)
from autocompress.spaces import CompressionSpace
from autocompress.tasks import Task

EXPERIMENT = "tune"
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")
log = logging.getLogger(__name__)


def _complete_pickle(path: Path) -> bool:
    """True if ``path`` is a whole pickle stream: opcodes are scanned, nothing is unpickled."""
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
        return True
    except Exception:
        return False


def saved_trial_ids(exp_dir: Path) -> set[str] | None:
    """Trial ids in Tune's newest saved state, or None if that state is missing or damaged.

    A SIGKILL can land while Tune copies its state files into ``run_dir/tune`` (it writes them
    in place), so each file is checked before Tune is asked to restore from it.
    """
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states or not (exp_dir / "tuner.pkl").is_file():
        return None
    session = states[-1].name.removeprefix("experiment_state-").removesuffix(".json")
    pickles = [exp_dir / "tuner.pkl", exp_dir / f"searcher-state-{session}.pkl"]
    pickles.append(exp_dir / f"search_gen_state-{session}.json")  # a pickle despite its name
    try:
        state = json.loads(states[-1].read_bytes())
        ids = {json.loads(t[0])["trial_id"] for t in state["trial_data"]}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    if not all(p.is_file() and _complete_pickle(p) for p in pickles):
        return None
    return {str(i) for i in ids}


def put_up_for_adoption(run_dir: Path, known: set[str]) -> list[dict[str, Any]]:
    """Move finished records of trials unknown to Tune to ``records/adopt/``; return their params.

    Duplicates are dropped (their original is what matters); claims left by a killed adoption
    go back into the pool.
    """
    pool = run_dir / "records" / ADOPT
    pool.mkdir(parents=True, exist_ok=True)
    for claim in pool.glob(".claim-*.json"):
        tid = claim.name.removeprefix(".claim-").removesuffix(".json")
        if record_path(run_dir, tid).is_file():
            claim.unlink()
        else:
            claim.rename(pool / f"{plan_key(json.loads(claim.read_text())['plan_json'])}.json")
    for rec in read_records(run_dir).values():
        tid = rec["trial_id"]
        if tid in known or rec.get("refined_from"):  # refined trials are found by refine()
            continue
        slot = pool / f"{plan_key(rec['plan_json'])}.json"
        if rec.get("duplicate_of") or slot.exists() or not isinstance(rec.get("params"), dict):
            record_path(run_dir, tid).unlink()
        else:
            record_path(run_dir, tid).rename(slot)
    out = []
    for slot in sorted(pool.glob("[!.]*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            out.append(dict(json.loads(slot.read_text())["params"]))
    return out


def unadopted(run_dir: Path) -> int:
    """Finished records still waiting for adoption (trials the resumed search did not redo)."""
    return len(list((run_dir / "records" / ADOPT).glob("[!.]*.json")))


def _error_reason(error: BaseException | None) -> str | None:
    """A one-line reason from a Tune error (its last meaningful traceback line)."""
    if error is None:
        return None
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and "^" not in ln]
    last = lines[-1] if lines else type(error).__name__
    return f"crashed: {last.split('. ')[0]}"[:300]


def fit(
    task: Task,
    space: CompressionSpace,
    objective: Objective,
    run_dir: Path,
    reference: Reference,
    points: list[dict[str, Any]],
    sampler: Any,
    settings: dict[str, Any],
    progress: bool,
    verbose: bool,
    resume: bool,
    quiet: contextlib.AbstractContextManager,
    storage_uri: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the Tune experiment in ``run_dir/tune``; return ``{trial_id: {error, plan_json,
    status}}`` (``status``: Tune's trial status; PENDING/RUNNING means interrupted).

    ``storage_uri``: the run lives on object storage and ``run_dir`` is the driver's local
    mirror of it (``search/_storage.py``): trials read and write the URI, each trial's record
    is pulled into the mirror when it reports, and Tune's own state stays in the mirror.

    Must be called with Ray initialized. With ``resume`` and a restorable experiment, the
    experiment (trials, searcher and sampler state) is restored with ``Tuner.restore``;
    otherwise a new one starts, seeded with the finished records (see the module docstring).
    """
    import optuna
    import ray
    from ray import tune

    from autocompress.search._bookkeeping import SyncRemoteRun, TrimFinishedTrials
    from autocompress.search._progress import ProgressCallback
    from autocompress.search._searcher import (
        ConstrainedOptunaSearch,
        SpaceFn,
        make_sampler,
    )

    trials = settings["trials"]
    # the task (teacher + data) goes to the object store once; each worker process fetches it
    # once per run (search/_trial.worker_cache), the trials get only this handle
    shipment = Shipment(f"{run_dir}#{uuid.uuid4().hex}", ray.put(task))
    remote = Remote(storage_uri) if storage_uri else None
    trial_settings = TrialSettings(
        run_dir=storage_uri or str(run_dir),
        cpus_per_trial=settings["cpus_per_trial"],
        trial_timeout=settings["trial_timeout"],
        reference=reference,
        seed=settings["seed"],
        device=settings["device"],
        early_stop=EarlyStop(**settings["early_stop"]) if settings.get("early_stop") else None,
    )
    full_space = space
    if settings.get("refine"):  # the budget screens cheap plans; refine() fine-tunes the best
        space = screening_space(space, int(settings.get("screen_steps") or 0))
    trainable = tune.with_parameters(
        run_trial, shipment=shipment, objective=objective, settings=trial_settings
    )
    trainable = tune.with_resources(
        trainable, {"cpu": settings["cpus_per_trial"], "gpu": settings["gpus_per_trial"]}
    )
    exp_dir = run_dir / EXPERIMENT
    known = saved_trial_ids(exp_dir) if resume else None
    with quiet:
        tuner = None
        if known is not None:
            orphans = put_up_for_adoption(run_dir, known)
            if remote is not None:  # the trials adopt from the URI's pool
                remote.sync_records(run_dir)
            try:
                storage = study_storage(run_dir)  # trims a cut last line, clears a stale lock
                if orphans:  # proposed again first, then adopted by the trials that get them
                    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
                    for params in orphans:
                        study.enqueue_trial(params)
                # errored trials stay failed (a crash is a result): only unfinished ones rerun
                tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=False)
            except Exception as e:  # damaged beyond the checks: start again from the records
                log.warning("cannot restore the Tune experiment (%s): starting it again", e)
                tuner = None
        if tuner is None:
            if resume:  # no usable Tune state: a new experiment that adopts every record
                adopted = put_up_for_adoption(run_dir, set())
                if remote is not None:
                    remote.sync_records(run_dir)
                shutil.rmtree(exp_dir, ignore_errors=True)
                (run_dir / STUDY_FILE).unlink(missing_ok=True)
                points = adopted + [p for p in points if p not in adopted]
            names, modes = objective.search_metrics
            single = len(names) == 1
            if isinstance(sampler, str):
                sampler = make_sampler(sampler, settings["seed"], trials)
            searcher = ConstrainedOptunaSearch(
                SpaceFn(space),
                metric=names[0] if single else names,
                mode=modes[0] if single else modes,
                sampler=sampler,
                points_to_evaluate=points or None,
                study_name=STUDY_NAME,
                storage=study_storage(run_dir),
                log_metrics=objective.log_scaled,
                constraint_names=[str(c) for c in objective.constraints],
            )
            callbacks: list[Any] = [TrimFinishedTrials()]
            if remote is not None:  # first: the progress line reads the pulled records
                callbacks.insert(0, SyncRemoteRun(remote.uri, str(run_dir)))
            if progress:
                callbacks.append(
                    ProgressCallback(
                        trials,
                        objective.names,
                        objective.directions,
                        str(run_dir),
                        settings["time_budget"],
                        settings["workers"],
                    )
                )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    num_samples=trials,
                    max_concurrent_trials=settings["workers"],
                    reuse_actors=True,
                    time_budget_s=settings["time_budget"],
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(run_dir),
                    failure_config=tune.FailureConfig(max_failures=settings["max_failures"]),
                    verbose=1 if verbose else 0,
                    callbacks=callbacks,
                ),
            )
        grid = tuner.fit()
        out = _trials_of(grid)
        interrupted = any(t.get("status") in UNFINISHED for t in out.values())
        if settings.get("refine") and not interrupted:
            args = (full_space, objective, shipment, trial_settings, settings)
            out.update(refine(run_dir, out, *args, progress=progress))
    return out


def screening_space(space: CompressionSpace, steps: int) -> CompressionSpace:
    """``space`` whose plans only calibrate: no fine-tune (``steps == 0``) or ``steps``
    optimizer steps of the space's fine-tune settings.

    Example:
        >>> from autocompress.tasks import get_task
        >>> from autocompress.spaces import Knobs
        >>> space = CompressionSpace.from_model(get_task("digits-mlp").teacher(), Knobs())
        >>> screening_space(space, 0).finetune.epochs, screening_space(space, 20).finetune.max_steps
        (0, 20)
    """
    ft = space.finetune
    cheap = replace(ft, max_steps=steps) if steps > 0 else replace(ft, epochs=0)
    return replace(space, finetune=cheap)


def pick_promising(
    records: dict[str, dict[str, Any]], objective: Objective, k: int, margin: float = 0.0
) -> list[dict[str, Any]]:
    """The ``k`` most promising screened trials: the Pareto front (on val) of the COMPLETE
    non-duplicate records, spread evenly along it (sorted by the first metric); when the front
    is smaller than ``k``, the next front (the front of the rest), and so on.

    Infeasible records whose ``violation`` (the sum of relative constraint violations) is at
    most ``margin`` and that no feasible record dominates come first, front by front, spread
    along each front by the first metric:
    a fine-tune recovers part of a post-training loss (measured on MiniLM: 200 steps of
    hidden-state distillation took an 8.26x plan from cosine 0.9743 to 0.9857, with
    ``accuracy_drop <= 0.01`` a violation of about 1.6 -> 0.4), so these are the plans that can
    move the feasible front to smaller sizes, while refining a plan that is feasible already
    only polishes its score. Then the feasible records, then the remaining infeasible ones (a
    calibration-only candidate may still meet its constraint after the fine-tune).
    ``margin=0`` is feasible first, then infeasible.
    """
    if not (isinstance(margin, int | float) and not isinstance(margin, bool) and margin >= 0):
        raise ValueError(f"margin={margin!r} must be a number >= 0")
    ok = [
        r
        for r in records.values()
        if r["status"] == "COMPLETE"
        and not r.get("duplicate_of")
        and all(n in r.get("values", {}) for n in objective.names)
    ]
    chosen: list[dict[str, Any]] = []
    if margin > 0:
        feasible = [r for r in ok if r.get("feasible")]
        near = [
            r
            for r in ok
            if not r.get("feasible")
            and _violation(r) <= margin
            and not any(_dominates(f, r, objective) for f in feasible)
        ]
        chosen += _peel(near, objective, k)
    for feasible in (True, False):
        pool = [
            r for r in ok if bool(r.get("feasible")) == feasible and all(r is not c for c in chosen)
        ]
        chosen += _peel(pool, objective, k - len(chosen))
    return chosen


def _dominates(a: dict[str, Any], b: dict[str, Any], objective: Objective) -> bool:
    """Whether record ``a`` is at least as good as ``b`` on every objective (on val) and better
    on one: a near-feasible ``b`` dominated by a feasible ``a`` cannot move the front."""
    better = False
    for m in objective.metrics:
        x, y = float(a["values"][m.name]), float(b["values"][m.name])
        if m.direction == "minimize":
            x, y = -x, -y
        if x < y:
            return False
        better = better or x > y
    return better


def _violation(rec: dict[str, Any]) -> float:
    """A record's summed relative constraint violation (``inf`` when it has none)."""
    v = rec.get("violation")
    try:
        return float(v) if v is not None else math.inf
    except (TypeError, ValueError):
        return math.inf


def _peel(pool: list[dict[str, Any]], objective: Objective, k: int) -> list[dict[str, Any]]:
    """Up to ``k`` records of ``pool``, front by front, spread along each front."""
    import numpy as np

    from autocompress.search._pareto import non_dominated

    first = objective.metrics[0]
    chosen: list[dict[str, Any]] = []
    while pool and len(chosen) < k:
        vals = np.array([[float(r["values"][n]) for n in objective.names] for r in pool])
        mask = non_dominated(vals, objective.directions)
        layer = [r for r, m in zip(pool, mask, strict=True) if m]
        layer.sort(
            key=lambda r: (float(r["values"][first.name]), r["trial_id"]),
            reverse=first.direction == "maximize",
        )
        want = min(k - len(chosen), len(layer))
        idx = sorted({round(i) for i in np.linspace(0, len(layer) - 1, want)})
        chosen += [layer[i] for i in idx]
        pool = [r for r, m in zip(pool, mask, strict=True) if not m]
    return chosen


def refine_id(trial_id: str) -> str:
    """The trial id of the refined re-run of screened trial ``trial_id``."""
    return f"{trial_id}_refined"


def refine(
    run_dir: Path,
    tune_trials: dict[str, dict[str, Any]],
    space: CompressionSpace,
    objective: Objective,
    shipment: Shipment,
    trial_settings: TrialSettings,
    settings: dict[str, Any],
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Re-run the ``settings["refine"]`` most promising screened plans (:func:`pick_promising`
    with ``settings["refine_margin"]``) with the space's full fine-tune settings,
    ``settings["workers"]`` at a time on the Ray cluster.

    Each re-run is a trial of its own (id ``<screened id>_refined``, record field
    ``refined_from``); a refined record already on disk (a resumed run) is kept, not redone.
    With ``progress``, a line on stderr when the stage starts and one per finished fine-tune
    (what it scored, an ETA): each takes minutes on a real model.
    Returns ``{trial_id: {error, plan_json, status}}`` entries for the trials table.
    """
    import ray

    from autocompress.search._progress import refine_line
    from autocompress.spaces import Plan

    records = read_records(run_dir)
    screened = {t: r for t, r in records.items() if t in tune_trials and not r.get("refined_from")}
    jobs = []
    margin = float(settings.get("refine_margin", 0.0))  # runs started before it: 0
    for rec in pick_promising(screened, objective, int(settings["refine"]), margin):
        plan = Plan.from_json(rec["plan_json"]).replace(finetune=space.finetune)
        jobs.append((refine_id(rec["trial_id"]), plan.to_json(), rec["trial_id"]))
    out = {tid: {"error": None, "plan_json": pj, "status": "TERMINATED"} for tid, pj, _ in jobs}
    todo = [j for j in jobs if read_record(run_dir, j[0]) is None]
    remote = ray.remote(_refine_remote).options(
        num_cpus=settings["cpus_per_trial"],
        num_gpus=settings["gpus_per_trial"] or None,
        max_retries=0,
    )
    running: dict[Any, tuple[str, str, str]] = {}
    workers, metric = max(1, int(settings["workers"])), objective.names[0]
    start, resumed = time.monotonic(), len(jobs) - len(todo)
    done = resumed

    def say(record: dict[str, Any] | None) -> None:
        if progress and jobs:
            took = time.monotonic() - start
            line = refine_line(done, len(jobs), record, metric, took, workers, resumed)
            print(line, file=sys.stderr, flush=True)

    say(None)
    while todo or running:
        while todo and len(running) < workers:
            tid, pj, orig = todo.pop(0)
            ref = remote.remote(tid, pj, orig, shipment, objective, trial_settings)
            running[ref] = (tid, pj, orig)
        ready, _ = ray.wait(list(running), num_returns=1)
        tid, pj, orig = running.pop(ready[0])
        if is_uri(trial_settings.run_dir):  # the refined record, into the driver's mirror
            Remote(trial_settings.run_dir).pull_record(run_dir, tid)
        try:
            ray.get(ready[0])
            error = None
        except Exception as e:  # the worker died (watchdog or crash): keep its record if any
            error = _error_reason(e)
        rec = read_record(run_dir, tid)
        if rec is None and error is not None:
            out[tid]["error"] = error
        done += 1
        say(rec or {"trial_id": tid, "status": "FAILED", "reason": "died"})
    return out


def _refine_remote(
    trial_id: str,
    plan_json: str,
    refined_from: str,
    shipment: Shipment,
    objective: Objective,
    settings: TrialSettings,
) -> str:
    """One refined trial in a Ray worker: evaluate, write the record, return its status."""
    import torch

    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    extra = {"refined_from": refined_from, "params": {}}
    rec = guarded_evaluate(trial_id, plan_json, shipment, objective, settings, extra)
    write_record(settings.run_dir, rec)
    return str(rec["status"])


def _trials_of(grid: Any) -> dict[str, dict[str, Any]]:
    """``{trial_id: {error, plan_json}}`` for every trial of a ResultGrid, in Tune's order.

    A trial stopped before it reported has no ``trial_id`` in its metrics, so ids come from the
    grid's trials (same order as its results) when available.
    """
    analysis = getattr(grid, "_experiment_analysis", None)
    trials = list(analysis.trials) if analysis is not None else []
    out: dict[str, dict[str, Any]] = {}
    for i, result in enumerate(grid):
        same = len(trials) == len(grid)
        tid = trials[i].trial_id if same else (result.metrics or {}).get("trial_id")
        if not tid:
            continue
        out[str(tid)] = {
            "error": _error_reason(result.error),
            "plan_json": (result.config or {}).get("plan_json"),
            "status": str(trials[i].status) if same else "",
        }
    return out
