"""Ray session helpers: quiet output, start or join a cluster, resources, stale trials."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from autocompress.errors import AutocompressError
from autocompress.search._common import STUDY_NAME


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Silence Tune's per-trial logging and library warnings unless ``verbose``."""
    if verbose:
        yield
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("ray.tune", "ray.train", "ray.air")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable ``host:port`` (``ray.init`` would retry for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        host, port = hostport, "10001"  # Ray Client's default port
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise AutocompressError(
            f"cannot reach the Ray cluster at address={address!r} ({e.strerror or e}): start it "
            "with `ray start --head`, check host and port, or leave address unset to run locally"
        ) from None


def start_ray(address: str | None, cpus: int, verbose: bool) -> bool:
    """Start or join Ray; True if this call started it (so it shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.WARNING
    if address is not None:
        probe(address)
        try:
            ray.init(address=address, log_to_driver=verbose, logging_level=level)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise AutocompressError(
                f"cannot join the Ray cluster at address={address!r} ({first}): start one with "
                "`ray start --head` or leave address unset to run locally"
            ) from None
        return True
    # The workers Ray starts inherit this environment: they import user 'module:function'
    # code from the cwd, and glibc keeps at most 2 malloc arenas. Tune runs every trial in a
    # new thread; with glibc's default (8 per core) each new thread's arena kept its freed
    # memory and a reused worker's heap grew by ~80 MB over its first ~40 trials
    # (benchmarks/reliability.py).
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MALLOC_ARENA_MAX")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), saved["PYTHONPATH"]) if p)
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    try:
        # "local": always a new private instance; without it ray.init silently joins the last
        # cluster `ray start` left on this machine (and then refuses num_cpus)
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=level,
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    import ray

    have = ray.cluster_resources()
    for key, want in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)):
        if want > have.get(key, 0.0):
            raise AutocompressError(
                f"a trial needs {want:g} {key} but the Ray cluster has {have.get(key, 0.0):g}: "
                f"lower {key.lower()}s_per_trial"
            )


def fail_stale_optuna_trials(run_dir: Path) -> None:
    """Mark Optuna trials left RUNNING by a killed driver as FAIL (dashboards show them)."""
    import optuna

    from autocompress.search._common import STUDY_FILE
    from autocompress.search._journal import study_storage

    if not (run_dir / STUDY_FILE).is_file():
        return
    with contextlib.suppress(Exception):
        storage = study_storage(run_dir)
        study_id = storage.get_study_id_from_name(STUDY_NAME)
        for t in storage.get_all_trials(study_id, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
