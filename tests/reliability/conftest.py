"""Fixtures of the fault-injection tests (helpers live in ``rkit``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from rkit import HERE, TALLY, Driver


@pytest.fixture
def tally() -> dict[str, int]:
    """Counts reported at the end of the session (the figures in docs/reliability.md)."""
    return TALLY


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if any(TALLY.values()):
        terminalreporter.write_line(
            "reliability: " + ", ".join(f"{v} {k}" for k, v in TALLY.items())
        )


@pytest.fixture(scope="module")
def ray_local():
    """A private 2-CPU Ray for in-process searches; workers can import ``faultkit``."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), old) if p)
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
    yield
    ray.shutdown()


@pytest.fixture
def drivers():
    """Drivers started by a test; all their processes are killed at teardown."""
    started: list[Driver] = []

    def start(args: list[str], log: Path, **env_extra: str) -> Driver:
        d = Driver(args, log, **env_extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()
