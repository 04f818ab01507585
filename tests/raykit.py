"""Helpers shared by the Ray tests (``tests/search``, ``tests/reliability``): a private Ray, and
the processes a test started, found and killed by PID.

Only processes started by the tests are ever signalled: a driver's descendants are collected
from /proc while it runs (so orphans left by a SIGKILL are known by PID), and exactly those PIDs
are killed afterwards. Ray is never stopped globally (``ray stop`` would end other users' Ray).
Importable as ``raykit`` because pytest puts ``tests/`` (the root conftest's folder) on
``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_pids(pids: list[int] | set[int]) -> None:
    """SIGKILL exactly these PIDs (each one started by a test), ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def private_ray(importable: Path) -> Iterator[None]:
    """A private 2-CPU Ray for in-process searches, shut down afterwards; its workers can import
    the modules in ``importable``. ``address="local"``: never joins a cluster someone else
    started with ``ray start``. If Ray is already initialized, that one is used and kept."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    old = os.environ.get("PYTHONPATH")
    here = str(Path(__file__).resolve().parent)  # test modules import raykit itself
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(importable), here, old) if p)
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    try:
        yield
    finally:
        ray.shutdown()
