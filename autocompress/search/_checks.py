"""Validate every search setting before anything starts (one table of rules, one place)."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from autocompress.errors import ConfigError
from autocompress.objectives import Objective
from autocompress.spaces import CompressionSpace
from autocompress.tasks import Task

KEEP = ("pareto", "all", "none")
_ADDRESS = re.compile(r"^(auto|local|ray://[\w.\-]+(:\d+)?|[\w.\-]+:\d+)$")


def _number(name: str, value: Any, *, low: float, strict: bool, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low) and value == value and value < 1e300
    if not ok:
        rule = f"> {low:g}" if strict else f">= {low:g}"
        extra = " or None" if optional else ""
        raise ConfigError(f"{name}={value!r} is invalid: use a number {rule}{extra}")


def _integer(name: str, value: Any, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ConfigError(f"{name}={value!r} is invalid: use an integer >= {low}")


def validate(
    task: Any,
    space: Any,
    objective: Any,
    *,
    trials: Any,
    workers: Any,
    sampler: Any,
    seed: Any,
    time_budget: Any,
    trial_timeout: Any,
    address: Any,
    keep_artifacts: Any,
    cpus_per_trial: Any,
    gpus_per_trial: Any,
    max_failures: Any,
) -> None:
    """Raise :class:`ConfigError` naming the first bad setting and what is allowed."""
    from autocompress.compress import check_plan
    from autocompress.search._common import SAMPLERS

    if not isinstance(task, Task):
        raise ConfigError(f"task must be an autocompress Task, got {type(task).__name__}")
    if not isinstance(space, CompressionSpace):
        raise ConfigError(
            f"space must be a CompressionSpace, got {type(space).__name__}: "
            "use CompressionSpace.from_model(task.teacher(), ...)"
        )
    if not isinstance(objective, Objective):
        raise ConfigError(f"objective must be an Objective or None, got {type(objective).__name__}")
    _integer("trials", trials, 1)
    _integer("workers", workers, 1)
    _integer("seed", seed, 0)
    _integer("max_failures", max_failures, 0)
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler={sampler!r} is unknown: use one of {list(SAMPLERS)}")
    else:
        import optuna

        if not isinstance(sampler, optuna.samplers.BaseSampler):
            raise ConfigError(
                f"sampler={sampler!r} is invalid: use one of {list(SAMPLERS)} or an Optuna sampler"
            )
    _number("time_budget", time_budget, low=0, strict=True, optional=True)
    _number("trial_timeout", trial_timeout, low=0, strict=True, optional=True)
    _number("cpus_per_trial", cpus_per_trial, low=0, strict=True)
    _number("gpus_per_trial", gpus_per_trial, low=0, strict=False)
    if keep_artifacts not in KEEP:
        raise ConfigError(f"keep_artifacts={keep_artifacts!r} is unknown: use one of {list(KEEP)}")
    if address is not None and not (isinstance(address, str) and _ADDRESS.match(address)):
        raise ConfigError(
            f"address={address!r} is invalid: use 'auto', 'host:port' or 'ray://host:port'"
        )
    check_plan(task.build_model(), space.uniform())  # the space belongs to this architecture


MIN_FREE_BYTES = 16 << 20
STARTUP_FILES = ("teacher", "sensitivity")
"""What a run writes before ``run.json``: a run killed then holds only these (and temp files)."""


def space_needed(teacher_bytes: int, trials: int) -> int:
    """A floor on the free space a run needs in ``run_dir``.

    Every trial keeps its artifact until the end (compressed artifacts are typically well under
    a quarter of the fp32 teacher) plus a record and Tune's per-trial files (~32 KiB); the
    teacher is exported once; 16 MiB covers run.json, the tables, optuna.journal and Tune's state.
    """
    return MIN_FREE_BYTES + 2 * teacher_bytes + trials * (teacher_bytes // 4 + (32 << 10))


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def check_free_space(rd: Path, need: int, free: int | None = None) -> None:
    """Refuse a ``run_dir`` on a file system with less than ``need`` bytes free."""
    free = shutil.disk_usage(rd).free if free is None else free
    if free < need:
        raise ConfigError(
            f"run_dir {str(rd)!r} has {_mb(free)} free but this run needs about {_mb(need)}: "
            "free some space or choose a run_dir on another disk"
        )


def _startup_leftovers(rd: Path) -> bool:
    """True if ``rd`` holds nothing but what a run killed during start-up leaves."""
    return all(p.name in STARTUP_FILES or p.name.startswith(".") for p in rd.iterdir())


def _holds_files(rd: Path) -> bool:
    return rd.is_dir() and any(p.name != LOCK_FILE for p in rd.iterdir())


def check_run_dir(run_dir: Any, resume: bool) -> Path:
    """The resolved ``run_dir`` if a run may use it; nothing is created or changed.

    Refuses a file, a used directory without ``resume``, ``resume`` without a run, and a
    directory another driver is using (:func:`check_not_in_use`).
    """
    if not isinstance(run_dir, str | os.PathLike) or not str(run_dir):
        raise ConfigError(f"run_dir={run_dir!r} is invalid: give a directory path")
    if not isinstance(resume, bool):
        raise ConfigError(f"resume={resume!r} must be True or False")
    from autocompress.search._storage import locate

    rd = locate(run_dir)  # a URI that lost a slash (s3:/bucket) is refused, not made a folder
    if not isinstance(rd, Path):  # callers handle URIs (search/_storage.py) before this
        raise ConfigError(f"run_dir {str(run_dir)!r} is a URI: not a local directory")
    if rd.exists() and not rd.is_dir():
        raise ConfigError(f"run_dir {str(rd)!r} is a file: choose a directory")
    check_not_in_use(rd)
    started = (rd / "run.json").is_file()
    if resume and not started and not rd.is_dir():
        raise ConfigError(
            f"resume=True but {str(rd)!r} holds no run (no run.json): run without resume"
        )
    if resume and not started and not _startup_leftovers(rd):
        raise ConfigError(
            f"resume=True but {str(rd)!r} holds no run (no run.json) and other files: "
            "choose the run_dir of the run to resume"
        )
    if not resume and _holds_files(rd):
        raise ConfigError(
            f"run_dir {str(rd)!r} already holds files: pass resume=True to continue that run "
            "or choose another run_dir"
        )
    return rd


def prepare_run_dir(run_dir: Any, resume: bool, need_bytes: int = MIN_FREE_BYTES) -> Path:
    """Resolve and create ``run_dir``, checking it is writable, has room and matches ``resume``.

    ``resume=True`` on a directory a killed run left before writing ``run.json`` (empty, or
    holding only a partial teacher export) starts that run afresh.
    """
    rd = check_run_dir(run_dir, resume)
    started = (rd / "run.json").is_file()
    try:
        rd.mkdir(parents=True, exist_ok=True)
        probe = rd / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"run_dir {str(rd)!r} is not writable ({e.strerror}): choose another"
        ) from None
    if resume and not started:  # killed during start-up: nothing to keep
        clear_run_dir(rd)
    check_free_space(rd, need_bytes)
    return rd


def clear_run_dir(rd: Path) -> None:
    """Delete everything in ``rd`` but the driver's lock file."""
    for p in rd.iterdir():
        if p.name != LOCK_FILE:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


LOCK_FILE = ".driver.json"
"""``run_dir/.driver.json``: held (``flock``) by the one driver using the run directory; it
holds that driver's pid, host and start time. The kernel drops the lock when the process dies,
so a killed driver never leaves a stale lock behind; a driver that ends removes the file."""


_HELD: set[Path | None] = set()
"""Run directories whose lock this process holds."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _in_use(rd: Path) -> ConfigError:
    return ConfigError(
        f"run_dir {str(rd)!r} is in use by another autocompress driver "
        f"({_holder(rd / LOCK_FILE)}): wait for it to finish or stop it; "
        "a run directory has one driver at a time"
    )


class RunLock:
    """The exclusive ``flock`` on ``run_dir/.driver.json`` held while a driver uses a run.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> lock = RunLock.acquire(d)
        >>> try:
        ...     RunLock.acquire(d)
        ... except ConfigError as e:
        ...     print(str(e).split(" (")[0])
        run_dir ... is in use by another autocompress driver
        >>> lock.release()
        >>> RunLock.acquire(d).release()
    """

    def __init__(self, fd: int | None, rd: Path | None = None) -> None:
        self.fd, self.rd = fd, rd
        if rd is not None:
            _HELD.add(rd)

    @classmethod
    def acquire(cls, rd: Path) -> RunLock:
        """Lock ``rd`` (created if needed) for this process, or raise naming the holder.

        A directory that cannot be created gets no lock (a no-op one): the run-dir checks that
        follow refuse it with the reason.
        """
        import fcntl
        import socket
        import time

        path = rd / LOCK_FILE
        while True:
            try:
                rd.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return cls(None)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise _in_use(rd) from None
            try:  # the holder removes the file when it ends: lock the file that is there now
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(fd, rd)

    def release(self) -> None:
        """Give the run directory up (also done by the kernel when the process dies)."""
        import fcntl

        if self.fd is not None:
            if self.rd is not None:  # removed while still held (see acquire)
                (self.rd / LOCK_FILE).unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        _HELD.discard(self.rd)


def check_not_in_use(rd: Path) -> None:
    """Raise :class:`ConfigError` naming the holder if a live driver holds ``rd``'s lock."""
    import fcntl

    if rd in _HELD:
        return  # this process is the driver
    try:
        fd = os.open(rd / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody ever held it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _in_use(rd) from None
    finally:
        os.close(fd)  # closing drops a lock this check took


def preflight(
    run_dir: Any,
    resume: bool,
    task_spec: str,
    objective: Objective,
    settings: dict[str, Any],
) -> Path | str:
    """The run-dir and resume checks that need no task: run before any task code runs.

    With ``resume``, the task spec, the objective and ``trials``/``sampler``/``seed`` of
    ``settings`` must match the run's ``run.json`` (the space is compared later, by
    :func:`check_resume`, since it needs the model).
    """
    from autocompress.search._storage import Remote, locate

    loc = locate(run_dir)
    if isinstance(loc, Remote):  # contacted now: a bad bucket or endpoint is one line
        loc.check_access()
        old = loc.read_json("run.json") if loc.check_use(resume, clean=False) else None
        rd: Any = loc.uri
    else:
        rd = check_run_dir(run_dir, resume)
        started = resume and (rd / "run.json").is_file()
        old = json.loads((rd / "run.json").read_text()) if started else None
    if resume and old is not None:
        if old.get("task", {}).get("spec") != task_spec:
            raise ConfigError(
                f"resume: task {task_spec!r} differs from {old.get('task', {}).get('spec')!r}, "
                f"the task {str(rd)!r} was started with: pass the same task or a new run_dir"
            )
        if old.get("objective") != json.loads(json.dumps(objective.describe())):
            raise ConfigError(
                f"resume: the objective differs from the one {str(rd)!r} was started with: "
                "pass the same settings or start a new run_dir"
            )
        _same_settings(rd, old, settings)
    return rd


def _same_settings(run_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in ("trials", "sampler", "seed"):
        if key in new and old.get("settings", {}).get(key) != new[key]:
            raise ConfigError(
                f"resume: {key}={new[key]!r} but the run was started with "
                f"{old.get('settings', {}).get(key)!r}: pass the same value"
            )


def describe_space(space: CompressionSpace) -> dict[str, Any]:
    """Plain-data description of a space (stored in ``run.json``, compared on resume)."""
    return {
        "layers": space.layer_names,
        "knobs": asdict(space.knobs),
        "exclude": list(space.exclude),
        "pin": {n: asdict(lp) for n, lp in space.pin.items()},
        "groups": [list(g) for g in space.groups],
        "finetune": asdict(space.finetune),
    }


def _with_new_defaults(old: Any, new: Any) -> Any:
    """``old``'s space description with settings added since it was written (knobs, fine-tune
    fields, pinned layers' knobs at their defaults in ``new``) filled in, so a run started by
    an older version resumes as long as the new settings keep their defaults."""
    from autocompress.spaces import FinetuneSettings, Knobs, LayerPlan

    if not isinstance(old, dict) or not isinstance(new, dict):
        return old
    out = dict(old)
    for key, default in (("knobs", Knobs()), ("finetune", FinetuneSettings())):
        o, n = out.get(key), new.get(key)
        if isinstance(o, dict) and isinstance(n, dict):
            base = json.loads(json.dumps(asdict(default), default=str))
            added = {k: v for k, v in n.items() if k not in o and base.get(k) == v}
            out[key] = {**o, **added}
    pins, new_pins = out.get("pin"), new.get("pin")
    if isinstance(pins, dict) and isinstance(new_pins, dict):  # layer knobs added since
        base = json.loads(json.dumps(asdict(LayerPlan()), default=str))
        out["pin"] = {
            name: {
                **lp,
                **{
                    k: v
                    for k, v in (new_pins.get(name) or {}).items()
                    if k not in lp and base.get(k) == v
                },
            }
            if isinstance(lp, dict)
            else lp
            for name, lp in pins.items()
        }
    return out


def check_resume(run_dir: Path, desc: dict[str, Any]) -> None:
    """Refuse to resume with a different task, space, objective or trial budget."""
    old = json.loads((run_dir / "run.json").read_text())
    new = json.loads(json.dumps(desc, default=str))
    if "space" in old:
        old["space"] = _with_new_defaults(old["space"], new.get("space"))
    for key in ("task", "space", "objective"):
        if old.get(key) != new[key]:
            raise ConfigError(
                f"resume: the {key} differs from the one {str(run_dir)!r} was started with: "
                "pass the same settings or start a new run_dir"
            )
    _same_settings(run_dir, old, new["settings"])
