"""Build (or restore) the Ray Tune experiment and run it."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from autocompress.objectives import Objective, Reference
from autocompress.search._common import STUDY_NAME
from autocompress.search._trial import TrialSettings, run_trial
from autocompress.spaces import CompressionSpace
from autocompress.tasks import Task

EXPERIMENT = "tune"


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
    """Run the Tune experiment in ``run_dir/tune``; return ``{trial_id: {error, plan_json}}``.

    Must be called with Ray initialized. With ``resume`` and a restorable experiment, the
    experiment (trials, searcher and sampler state) is restored with ``Tuner.restore``;
    otherwise a new one starts.
    """
    import optuna
    from ray import tune

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
        ),
    )
    trainable = tune.with_resources(
        trainable, {"cpu": settings["cpus_per_trial"], "gpu": settings["gpus_per_trial"]}
    )
    exp_dir = run_dir / EXPERIMENT
    with quiet:
        if resume and tune.Tuner.can_restore(str(exp_dir)):
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
        else:
            if resume:  # killed before Tune saved its state: start the search again, clean
                for name in ("records", "trials", "pareto", EXPERIMENT):
                    shutil.rmtree(run_dir / name, ignore_errors=True)
                (run_dir / "optuna.db").unlink(missing_ok=True)
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
                storage=optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'optuna.db'}"),
            )
            callbacks = []
            if progress:
                callbacks.append(
                    ProgressCallback(
                        trials,
                        objective.names,
                        objective.directions,
                        str(run_dir),
                        settings["time_budget"],
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
    ids = [t.trial_id for t in analysis.trials] if analysis is not None else []
    out: dict[str, dict[str, Any]] = {}
    for i, result in enumerate(grid):
        tid = ids[i] if len(ids) == len(grid) else (result.metrics or {}).get("trial_id")
        if not tid:
            continue
        out[str(tid)] = {
            "error": _error_reason(result.error),
            "plan_json": (result.config or {}).get("plan_json"),
        }
    return out
