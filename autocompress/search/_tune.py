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
import pickletools
import shutil
from pathlib import Path
from typing import Any

from autocompress.objectives import Objective, Reference
from autocompress.search._common import STUDY_FILE, STUDY_NAME
from autocompress.search._early import EarlyStop
from autocompress.search._journal import study_storage
from autocompress.search._trial import (
    ADOPT,
    TrialSettings,
    plan_key,
    read_records,
    record_path,
    run_trial,
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
        if tid in known:
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
) -> dict[str, dict[str, Any]]:
    """Run the Tune experiment in ``run_dir/tune``; return ``{trial_id: {error, plan_json,
    status}}`` (``status``: Tune's trial status; PENDING/RUNNING means interrupted).

    Must be called with Ray initialized. With ``resume`` and a restorable experiment, the
    experiment (trials, searcher and sampler state) is restored with ``Tuner.restore``;
    otherwise a new one starts, seeded with the finished records (see the module docstring).
    """
    import optuna
    from ray import tune

    from autocompress.search._bookkeeping import TrimFinishedTrials
    from autocompress.search._progress import ProgressCallback
    from autocompress.search._searcher import (
        ConstrainedOptunaSearch,
        SpaceFn,
        make_sampler,
    )

    trials = settings["trials"]
    trainable = tune.with_parameters(
        run_trial,
        task=task,
        objective=objective,
        settings=TrialSettings(
            run_dir=str(run_dir),
            cpus_per_trial=settings["cpus_per_trial"],
            trial_timeout=settings["trial_timeout"],
            reference=reference,
            seed=settings["seed"],
            device=settings["device"],
            early_stop=EarlyStop(**settings["early_stop"]) if settings.get("early_stop") else None,
        ),
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
    return _trials_of(grid)


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
