"""``refine_margin``: screened plans just past a constraint are refined alongside feasible ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autocompress import ConfigError, Task
from autocompress.objectives import Objective
from autocompress.search import run
from autocompress.search._common import REFINE_MARGIN
from autocompress.search._driver import _resumed_margin
from autocompress.search._tune import pick_promising
from autocompress.spaces import CompressionSpace, Knobs

OBJ = Objective(["accuracy", "size_bytes"], constraints=["accuracy_drop <= 0.01"])


def _rec(tid: str, acc: float, size: float, violation: float, **kw) -> dict:
    rec = {"trial_id": tid, "status": "COMPLETE", "plan_json": "{}", "violation": violation}
    vals = {"accuracy": acc, "size_bytes": size, "accuracy_drop": 1.0 - acc}
    return {**rec, "feasible": violation == 0.0, "values": vals, **kw}


def _pool() -> dict[str, dict]:
    """Feasible plans that are big, slightly infeasible small ones, a far-off tiny one."""
    recs = [
        _rec("big1", 0.999, 1000, 0.0),
        _rec("big2", 0.995, 900, 0.0),
        _rec("big3", 0.992, 850, 0.0),
        _rec("small1", 0.985, 400, 0.5),  # drop 0.015: violation 0.5
        _rec("small2", 0.975, 300, 1.5),
        _rec("tiny", 0.90, 100, 9.0),
    ]
    return {r["trial_id"]: r for r in recs}


def _ids(k: int, margin: float, pool: dict[str, dict] | None = None) -> list[str]:
    return [r["trial_id"] for r in pick_promising(pool or _pool(), OBJ, k, margin)]


def test_margin_picks_the_small_near_feasible_plans() -> None:
    # the infeasible plans within the margin first (they can move the front), then feasible
    assert _ids(2, 1.0) == ["small1", "big1"]
    assert _ids(2, 2.0) == ["small1", "small2"]  # both ends of the near front
    assert "small2" in _ids(3, 2.0) and "tiny" not in _ids(3, 2.0)
    # within the margin first, then the rest as before: feasible, then infeasible
    assert _ids(6, 1.0) == ["small1", "big1", "big2", "big3", "small2", "tiny"]


def test_margin_zero_is_feasible_first() -> None:
    assert _ids(2, 0.0) == ["big1", "big3"]
    assert _ids(4, 0.0) == ["big1", "big2", "big3", "small1"]
    assert _ids(2, 0.0) == [r["trial_id"] for r in pick_promising(_pool(), OBJ, 2)]
    assert REFINE_MARGIN == 1.0
    with pytest.raises(ValueError, match="margin"):
        pick_promising(_pool(), OBJ, 2, -0.1)


def test_records_without_a_violation_never_count_as_near() -> None:
    pool = _pool()
    del pool["small1"]["violation"]
    assert _ids(2, 1.0, pool) == ["big1", "big3"]


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), True, "1"])
def test_bad_refine_margin_raises(digits_mlp: Task, tmp_path: Path, bad) -> None:
    space = CompressionSpace.from_model(digits_mlp.teacher(), Knobs(bits=(4, 8)))
    with pytest.raises(ConfigError, match="refine_margin="):
        run(digits_mlp, space, trials=2, refine=1, refine_margin=bad, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_resume_keeps_the_margin_the_run_started_with(tmp_path: Path) -> None:
    def started(settings: dict) -> Path:
        (tmp_path / "run.json").write_text(json.dumps({"settings": settings}))
        return tmp_path

    assert _resumed_margin(started({"refine": 2, "refine_margin": 0.5}), 0.5) == 0.5
    with pytest.raises(ConfigError, match="refine_margin=1.0 but the run was started with 0.5"):
        _resumed_margin(started({"refine": 2, "refine_margin": 0.5}), 1.0)
    assert _resumed_margin(started({"refine": 2}), 1.0) == 0.0  # started before the setting
    assert _resumed_margin(started({"trials": 4}), 1.0) == 1.0  # refine was off then


def test_near_plans_a_feasible_plan_dominates_are_not_refined_first() -> None:
    recs = [
        _rec("feasible", 0.995, 500, 0.0),
        _rec("near_dominated", 0.985, 900, 0.5),  # bigger and worse than "feasible"
        _rec("near_small", 0.982, 300, 0.8),
    ]
    pool = {r["trial_id"]: r for r in recs}
    assert _ids(2, 1.0, pool) == ["near_small", "feasible"]
