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
STARTUP_FILES = ("teacher",)
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


def prepare_run_dir(run_dir: Any, resume: bool, need_bytes: int = MIN_FREE_BYTES) -> Path:
    """Resolve and create ``run_dir``, checking it is writable, has room and matches ``resume``.

    ``resume=True`` on a directory a killed run left before writing ``run.json`` (empty, or
    holding only a partial teacher export) starts that run afresh.
    """
    if not isinstance(run_dir, str | os.PathLike) or not str(run_dir):
        raise ConfigError(f"run_dir={run_dir!r} is invalid: give a directory path")
    if not isinstance(resume, bool):
        raise ConfigError(f"resume={resume!r} must be True or False")
    rd = Path(run_dir).expanduser().resolve()
    if rd.exists() and not rd.is_dir():
        raise ConfigError(f"run_dir {str(rd)!r} is a file: choose a directory")
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
    if not resume and rd.is_dir() and any(rd.iterdir()):
        raise ConfigError(
            f"run_dir {str(rd)!r} already holds files: pass resume=True to continue that run "
            "or choose another run_dir"
        )
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
        for p in rd.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    check_free_space(rd, need_bytes)
    return rd


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


def check_resume(run_dir: Path, desc: dict[str, Any]) -> None:
    """Refuse to resume with a different task, space, objective or trial budget."""
    old = json.loads((run_dir / "run.json").read_text())
    new = json.loads(json.dumps(desc, default=str))
    for key in ("task", "space", "objective"):
        if old.get(key) != new[key]:
            raise ConfigError(
                f"resume: the {key} differs from the one {str(run_dir)!r} was started with: "
                "pass the same settings or start a new run_dir"
            )
    for key in ("trials", "sampler", "seed"):
        if old.get("settings", {}).get(key) != new["settings"][key]:
            raise ConfigError(
                f"resume: {key}={new['settings'][key]!r} but the run was started with "
                f"{old['settings'].get(key)!r}: pass the same value"
            )
