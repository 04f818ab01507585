"""Fixtures of the fault-injection tests (helpers live in ``rkit``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from raykit import private_ray
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
    with private_ray(HERE):
        yield


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
