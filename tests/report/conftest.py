"""Fixtures of the report tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from reportkit import make_run


@pytest.fixture
def fake_run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")
