"""``run``: validate, train the teacher, start or join Ray, search with Tune + Optuna, finalize."""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress.errors import AutocompressError, ConfigError
from autocompress.objectives import Objective, Reference
from autocompress.search._checks import (
    MIN_FREE_BYTES,
    RunLock,
    check_resume,
    check_run_dir,
    clear_run_dir,
    describe_space,
    prepare_run_dir,
    space_needed,
    validate,
)
from autocompress.search._common import REFINE_MARGIN
from autocompress.search._early import EarlyStop
from autocompress.search._ray import (
    check_resources,
    fail_stale_optuna_trials,
    probe,
    quiet,
    start_ray,
)
from autocompress.search._result import SearchResult
from autocompress.search._storage import Remote, locate
from autocompress.spaces import CompressionSpace, Plan
from autocompress.tasks import Task

if TYPE_CHECKING:
    from torch import nn

    from autocompress.artifacts import Artifact

RUN_VERSION = 1
PROGRESS_VALUES = 5_000_000
"""Teachers with at least this many values print the teacher-artifact steps (seconds each)."""
log = logging.getLogger(__name__)
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_AUTH_MODE": "disabled",
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
    # Tune's default per-trial loggers (params.json, params.pkl, result.json, progress.csv and a
    # TensorBoard event file in a directory per trial): autocompress keeps its own records, and
    # writing them cost every trial time and left five files per trial in run_dir/tune
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}
PIP = {"ray": "'ray[tune]==2.60.0'", "ray.tune": "'ray[tune]==2.60.0'", "sklearn": "scikit-learn"}
DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EIO)


class SearchInterrupted(AutocompressError, KeyboardInterrupt):
    """Ctrl-C outside the search loop (e.g. during teacher training): nothing to save yet.

    Still a ``KeyboardInterrupt`` for Python callers, and one clear line on the command line.
    """


def missing_dependency(e: ImportError, what: str) -> AutocompressError:
    """A one-line error naming the missing module and the install command."""
    name = e.name or str(e)
    pip = PIP.get(name, PIP.get(name.split(".")[0], name.split(".")[0]))
    return AutocompressError(
        f"{what} needs the Python module {name!r}, which is not installed: pip install {pip}"
    )


def require(*modules: str) -> None:
    """Import ``modules`` now, so a missing one fails before anything starts."""
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise missing_dependency(e, "search.run") from None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the search runs, SIGTERM (a scheduler's stop) is handled like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def disk_problem(e: BaseException) -> str | None:
    """Why ``e`` (or an exception it wraps) is a full or unwritable disk, else None.

    Ray Tune and Optuna's SQLite storage wrap the ``OSError``; the chain is followed.
    """
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 20:
        if isinstance(cur, OSError) and cur.errno in DISK_ERRORS:
            return cur.strerror or str(cur)
        text = str(cur).lower()
        for sign in ("database or disk is full", "disk i/o error", "readonly database"):
            if sign in text:
                return sign
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return None


def _why_failed(e: BaseException, rd: Path) -> str | None:
    """:func:`disk_problem`, or "no space left on device" when ``rd``'s disk is full: a library
    reading back a file cut short by the full disk fails with another error (``EOFError`` from
    a truncated pickle, a JSON error), and the cause to report is still the disk."""
    why = disk_problem(e)
    if why is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(rd).free < MIN_FREE_BYTES:
                why = "no space left on device"
    return why


def _disk_error(why: str, rd: Path) -> AutocompressError:
    return AutocompressError(
        f"writing to run_dir {str(rd)!r} failed ({why}): free space or fix the permissions, "
        "then continue with --resume (resume=True); finished trials are kept"
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _export_teacher(teacher: nn.Module, tdir: Path, spec: str, progress: bool) -> Artifact:
    """The teacher's artifact in ``tdir``: reused from the content-hash cache when an earlier
    run exported the same weights (``artifacts._cache``), else exported once and cached. An
    unusable cache (read-only home, a full cache disk) only costs the export."""
    from autocompress.artifacts import export
    from autocompress.artifacts._cache import _stderr, cached_export

    # progress lines only where the steps take seconds (millions of values), not on small models
    big = sum(t.numel() for t in teacher.state_dict().values()) >= PROGRESS_VALUES
    try:
        return cached_export(
            teacher, Plan(), tdir, task_spec=spec, progress=_stderr if progress and big else None
        )
    except OSError as e:  # a full run disk fails again below and is reported as such
        log.warning("teacher artifact cache unusable (%s): exporting into the run only", e)
        shutil.rmtree(tdir, ignore_errors=True)
        return export(teacher, Plan(), tdir, task_spec=spec)


def _teacher(
    task: Task, objective: Objective, run_dir: Path, progress: bool = False
) -> tuple[dict, Reference]:
    """Export the teacher once to ``run_dir/teacher`` and score it on val and test."""
    from autocompress.artifacts import Artifact

    teacher = task.teacher()
    for split in ("train", "val", "test"):
        task.data(split)  # loaded here so the data ship to the workers with the task
    tdir = run_dir / "teacher"
    if (tdir / "manifest.json").is_file():
        art = Artifact.open(tdir)
    else:
        art = _export_teacher(teacher, tdir, task.spec, progress)
    ref = Reference(size_bytes=art.size_bytes)
    scores: dict[str, dict[str, float]] = {}
    for split in ("val", "test"):
        try:
            scores[split] = objective.evaluate(teacher, art, task, split, ref)
        except ImportError as e:  # every trial would fail the same way: say so now
            raise missing_dependency(e, f"objective {objective.names}") from None
        except Exception:  # a custom metric that cannot score the dense teacher
            scores[split] = Objective(["accuracy", "size_bytes"]).evaluate(
                teacher, art, task, split, ref
            )
        scores[split]["accuracy_drop"] = 0.0
    reference = Reference(art.size_bytes, {s: scores[s]["accuracy"] for s in scores})
    info = {"size_bytes": art.size_bytes, "artifact": "teacher", **scores}
    return info, reference


def _resumed_margin(rd: Path, margin: float) -> float:
    """The ``refine_margin`` a resumed run keeps picking its refined plans with: the one it was
    started with (0.0 for a run started before the setting existed: it picked feasible plans
    first), so a resume never refines a different set. Any other value is refused, the default
    included (as for ``trials``, ``sampler`` and ``seed``): a run started with
    ``--refine-margin 0.5`` resumes with ``--refine-margin 0.5``."""
    old = json.loads((rd / "run.json").read_text()).get("settings", {})
    if "refine" not in old:
        return margin
    if "refine_margin" not in old:
        if margin != 0.0:
            log.info("resume: this run was started before refine_margin existed: keeping 0.0")
        return 0.0
    if not math.isclose(float(old["refine_margin"]), margin):
        raise ConfigError(
            f"resume: refine_margin={margin!r} but the run was started with "
            f"{old['refine_margin']!r}: pass the same value"
        )
    return margin


def run(
    task: Task,
    space: CompressionSpace,
    objective: Objective | None = None,
    *,
    trials: int = 50,
    workers: int = 1,
    sampler: Any = "tpe",
    seed: int = 0,
    time_budget: float | None = None,
    trial_timeout: float | None = None,
    address: str | None = None,
    resume: bool = False,
    run_dir: str | os.PathLike[str] = "runs/latest",
    baselines: Sequence[Plan] | None = None,
    keep_artifacts: str = "pareto",
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    device: str = "cpu",
    max_failures: int = 0,
    early_stop: bool | EarlyStop = False,
    refine: int = 0,
    screen_steps: int = 0,
    refine_margin: float = REFINE_MARGIN,
    sensitivity: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> SearchResult:
    """Search compression plans of ``task``'s teacher for the Pareto front of ``objective``.

    Every setting is checked before anything runs. The teacher is trained (or loaded from the
    cache) here, exported once to ``run_dir/teacher`` (its size is the reference of
    ``compression_ratio``) and shipped to the workers once through Ray's object store. Ray Tune
    runs ``trials`` trials, ``workers`` at a time, each sampled by Optuna (``sampler``:
    ``"tpe"`` default: multi-objective TPE; ``"nsga2"``, ``"gp"``, ``"random"`` or an Optuna
    sampler) from ``space``; ``baselines`` run first (default: a warm start of uniform plans, a
    tenth of the budget, three classic ones plus a spread over width, sparsity and bits, see
    :func:`~autocompress.search._searcher.default_baselines`; ``[]`` for none). Metrics with
    ``scale="log"`` (sizes, latencies) are told to the sampler as ``log10``. Each trial
    compresses, fine-tunes (stopping at ``trial_timeout`` seconds, FAILED past 1.5x; a trial
    still running after 2x + 10 s is recorded FAILED and its worker process ended), exports a
    real artifact and scores it on val. A trial that raises, diverges or yields NaN is recorded
    FAILED with its reason and never enters the front; an identical plan proposed twice reuses
    the first result.

    Afterwards the front of feasible trials is re-scored on test from the artifacts on disk,
    and ``run_dir`` holds ``run.json``, ``trials.csv``, ``pareto.csv``, ``result.json``,
    ``optuna.journal`` (the Optuna study: ``optuna-dashboard <run_dir>/optuna.journal``),
    ``teacher/`` and
    ``pareto/<trial_id>/`` (``keep_artifacts``: ``"pareto"``; ``"all"`` also keeps
    ``trials/``; ``"none"`` keeps no trial artifact).

    ``address`` (``"auto"``, ``"host:port"``, ``"ray://host:port"``) joins a running cluster,
    whose nodes must all reach ``run_dir``: a path on a shared filesystem, or a URI on object
    storage (``"s3://bucket/prefix"``, ``"gs://..."``, any filesystem pyarrow or fsspec open;
    see ``search/_storage.py``: trials upload their records and artifacts there, the driver
    works in a local copy and resumes from the URI alone); a Ray already initialized in
    this process is used as is and never shut down. Ctrl-C (or SIGTERM) stops the search
    gracefully: the tables and the front of the trials so far are written and the result's
    ``message`` says how to resume. ``resume=True`` continues a killed or interrupted run in the
    same ``run_dir`` with the same settings: finished trials are kept (never run again), the
    budget is completed. ``max_failures`` retries trials whose worker crashed; past that they
    are FAILED, also after a resume. ``early_stop`` (``True`` or an
    :class:`~autocompress.search.EarlyStop`) stops the fine-tune of a candidate whose val score,
    a third of the way in, is more than 5 points below the lowest feasible score (it is recorded
    with that score and ``early_stopped``); off by default, see docs/search-quality.md.
    ``run_dir`` must be writable with room for the run (checked before anything starts). See
    docs/reliability.md. ``device="cuda"`` fine-tunes each candidate on the GPU share Ray
    assigns to the trial (``gpus_per_trial``). ``refine=K`` screens: the ``trials`` budget runs
    plans that only calibrate (no fine-tune, or ``screen_steps`` optimizer steps), then the K
    most promising ones (the val front, spread along it) are re-run with the space's full
    fine-tune as trials of their own (``refined_from``); the front is over all trials.
    ``refine_margin`` (default 1.0) lets screened plans that miss the constraints by at most
    that much (summed relative violation: with ``accuracy_drop <= 0.01``, a drop of 0.02 is
    1.0) compete with the feasible ones for those K (``search._tune.pick_promising``): a
    fine-tune wins part of a post-training loss back, so the smallest near-feasible plans are
    the ones worth it; 0 refines feasible plans first, as before the setting existed.
    ``sensitivity=True`` (with the default ``baselines``) first measures each layer unit's
    sensitivity alone, post-training, on 64 train examples (``spaces.sensitivity``, cached in
    ``run_dir/sensitivity``) and opens the search with greedy plans built from it and the
    hand-style plans (``spaces.sensitivity_plans``), before the uniform warm start; pair it
    with ``CompressionSpace.from_model(..., group_by="role")`` on deep models.

    Example:
        >>> from autocompress.tasks import get_task
        >>> from autocompress.spaces import CompressionSpace, Knobs
        >>> task = get_task("digits-mlp")
        >>> space = CompressionSpace.from_model(task.teacher(), Knobs(bits=(2, 4, 8)))
        >>> result = run(task, space, trials=20, workers=2, run_dir="runs/demo")  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
    """
    objective = Objective.default() if objective is None else objective
    require("optuna", "ray.tune")
    if early_stop is True:
        early_stop = EarlyStop()
    elif early_stop is False or early_stop is None:
        early_stop = None
    elif not isinstance(early_stop, EarlyStop):
        raise ConfigError(f"early_stop={early_stop!r}: use True, False or an EarlyStop(...)")
    for name, v in (("refine", refine), ("screen_steps", screen_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name}={v!r} must be an integer >= 0 (0: off)")
    if (
        isinstance(refine_margin, bool)
        or not isinstance(refine_margin, int | float)
        or not math.isfinite(refine_margin)
        or refine_margin < 0
    ):
        raise ConfigError(
            f"refine_margin={refine_margin!r} must be a number >= 0 (e.g. 1.0; 0: feasible first)"
        )
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is unknown: use 'cpu' or 'cuda'")
    if device == "cuda" and not gpus_per_trial:
        raise ConfigError("device='cuda' needs gpus_per_trial > 0 (e.g. 0.25 to share a GPU)")
    validate(
        task,
        space,
        objective,
        trials=trials,
        workers=workers,
        sampler=sampler,
        seed=seed,
        time_budget=time_budget,
        trial_timeout=trial_timeout,
        address=address,
        keep_artifacts=keep_artifacts,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        max_failures=max_failures,
    )
    loc = locate(run_dir) if isinstance(run_dir, str | os.PathLike) else None
    remote = loc if isinstance(loc, Remote) else None  # an unknown scheme: refused above
    from autocompress.search._searcher import (
        baseline_params,
        default_baselines,
        warm_start_size,
    )

    if baselines is None:
        plans = default_baselines(space, warm_start_size(trials), seed)
    else:
        plans = list(baselines)
    points = baseline_params(space, plans, strict=baselines is not None)[:trials]
    import ray

    if address is not None and not ray.is_initialized():
        probe(address)
    teacher_bytes = 4 * sum(p.numel() for p in task.build_model().parameters())
    if remote is not None:  # a missing bucket, refused credentials, no endpoint: one line now
        remote.check_access()
    # one driver per run_dir (for a URI: per local mirror of it, see search/_storage.py)
    lock = RunLock.acquire(remote.mirror() if remote else check_run_dir(run_dir, resume))
    try:
        if remote is not None:
            run_dir = remote.start_mirror(resume)
        rd = prepare_run_dir(run_dir, resume, space_needed(teacher_bytes, trials))
        resume = resume and (rd / "run.json").is_file()  # False: killed before it really started
        if sensitivity and baselines is None:  # measured once, cached in rd/sensitivity/
            from autocompress.spaces import sensitivity_plans

            if progress:
                print(
                    "autocompress: measuring layer sensitivity (once per run_dir)", file=sys.stderr
                )

            def said(line: str) -> None:  # one line per unit: minutes on a real model
                print(f"autocompress: {line}", file=sys.stderr, flush=True)

            try:
                first = sensitivity_plans(
                    task, space, objective, run_dir=rd, progress=said if progress else None
                )
            except BaseException:
                if not resume:
                    clear_run_dir(rd)
                raise
            plans = first + [p for p in plans if p not in first]
            points = baseline_params(space, plans, strict=False)[:trials]
        settings = {
            "trials": trials,
            "workers": workers,
            "seed": seed,
            "time_budget": time_budget,
            "sampler": sampler if isinstance(sampler, str) else type(sampler).__name__,
            "trial_timeout": trial_timeout,
            "address": address,
            "keep_artifacts": keep_artifacts,
            "cpus_per_trial": cpus_per_trial,
            "gpus_per_trial": gpus_per_trial,
            "device": device,
            "max_failures": max_failures,
            "baselines": points,
            "early_stop": None if early_stop is None else asdict(early_stop),
        }
        if refine:  # only when on, so runs made before these settings existed still resume
            settings.update(
                refine=refine, screen_steps=screen_steps, refine_margin=float(refine_margin)
            )
        if sensitivity:
            settings.update(sensitivity=True)
        desc = {
            "task": {"name": task.name, "spec": task.spec, "metric_name": task.metric_name},
            "space": describe_space(space),
            "objective": objective.describe(),
            "settings": settings,
        }
        if resume:
            check_resume(rd, desc)
            if refine:
                settings["refine_margin"] = _resumed_margin(rd, float(refine_margin))
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        t0 = time.monotonic()
        started = False
        try:
            teacher, reference = _teacher(task, objective, rd, progress)
            log.debug("teacher ready in %.1fs", time.monotonic() - t0)
            if not (rd / "run.json").is_file():
                run_json = {"_type": "autocompress-run", "_version": RUN_VERSION, **desc}
                run_json["teacher"] = teacher
                _write_json(rd / "run.json", run_json)
            if remote is not None and not resume:  # run.json last: the run has started
                remote.push(rd, ["teacher", "sensitivity", "run.json"])
            cpus = max(os.cpu_count() or 1, math.ceil(workers * cpus_per_trial))
            started = start_ray(address, cpus, verbose)
            check_resources(cpus_per_trial, gpus_per_trial)
        except BaseException as e:
            if started:
                ray.shutdown()
            if not resume:  # leave no half-made run behind: the same call can simply be retried
                clear_run_dir(rd)
                if remote is not None:
                    with contextlib.suppress(Exception):
                        remote.delete("run.json")
                        remote.delete("teacher")
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, SearchInterrupted):
                raise SearchInterrupted(
                    "interrupted before the search started; nothing was lost: run it again"
                    + (" with --resume" if resume else "")
                ) from None
            if isinstance(e, Exception) and (why := disk_problem(e)):
                raise _disk_error(why, rd) from None
            raise
        log.debug("ray ready at %.1fs", time.monotonic() - t0)
        try:
            from autocompress.search._tune import fit, unadopted

            with sigterm_as_interrupt():
                tune_trials = fit(
                    task,
                    space,
                    objective,
                    rd,
                    reference,
                    points,
                    sampler,
                    settings,
                    progress,
                    verbose,
                    resume,
                    quiet(verbose),
                    storage_uri=remote.uri if remote else None,
                )
        except KeyboardInterrupt:  # a second Ctrl-C: Tune's state was saved at the first
            raise SearchInterrupted(
                "interrupted; finished trials are kept: resume with --resume (resume=True)"
            ) from None
        except Exception as e:
            if why := _why_failed(e, rd):
                raise _disk_error(why, rd) from None
            raise
        finally:
            if started:
                ray.shutdown()
        log.debug("search done at %.1fs", time.monotonic() - t0)
        from autocompress.search._journal import sync_journal

        try:
            fail_stale_optuna_trials(rd)
            sync_journal(rd)
        except Exception as e:
            if why := _why_failed(e, rd):
                raise _disk_error(why, rd) from None
            raise
        if remote is not None:  # every record the trials wrote, including unreported ones
            shutil.rmtree(rd / "records", ignore_errors=True)
            remote.download("records", rd / "records")
        from autocompress.search._finalize import finalize

        statuses = [t.get("status", "") for t in tune_trials.values()]
        over_time = time_budget is not None and time.monotonic() - t0 >= time_budget
        interrupted = any(s in ("PENDING", "RUNNING", "PAUSED") for s in statuses) or (
            len(tune_trials) < trials and not over_time
        )
        settings = {**settings, "run_dir": str(remote or rd)}
        try:
            result = finalize(
                rd,
                tune_trials,
                task,
                objective,
                reference,
                teacher,
                settings,
                time.monotonic() - t0,
                interrupted=interrupted,
                unadopted=unadopted(rd),
                fetch=partial(remote.fetch_artifact, rd) if remote else None,
            )
            if remote is not None:
                remote.publish(rd, interrupted, keep_artifacts)
                result = replace(result, source=remote.uri)
        except Exception as e:
            if why := _why_failed(e, rd):
                raise _disk_error(why, rd) from None
            raise
        log.debug("finalized at %.1fs", time.monotonic() - t0)
        if progress and result.message:
            print(f"autocompress: {result.message}", file=sys.stderr)
        return result
    finally:
        lock.release()
