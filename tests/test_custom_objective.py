"""experiments/custom_objective.py end to end (real Ray, tiny budget), and its YAML route."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from autocompress.search._tables import read_csv

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
SCRIPT = EXPERIMENTS / "custom_objective.py"


@pytest.fixture
def experiments_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    yield
    sys.modules.pop("custom_objective", None)


def test_runs_end_to_end_and_the_front_respects_the_budget(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["--trials", "4", "--workers", "2", "--epochs", "1", "--run-dir", str(run_dir)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "best kNN accuracy within 20,000 bytes" in proc.stdout
    front = read_csv(run_dir / "pareto.csv")
    trials = read_csv(run_dir / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "COMPLETE").all()
    assert len(front) >= 1
    assert (front["size_bytes"] <= 20_000).all() and front["feasible"].all()
    assert (front["test_size_bytes"] <= 20_000).all()
    assert front["knn_accuracy"].between(0, 1).all() and "test_knn_accuracy" in front
    over = trials[trials["size_bytes"] > 20_000]
    assert not over["trial_id"].isin(front["trial_id"]).any()
    assert not over["feasible"].any()


def test_same_objective_from_yaml(experiments_on_path) -> None:
    from autocompress.config import build, parse_experiment
    from autocompress.objectives import get_metric

    exp = parse_experiment(
        {
            "task": "custom_objective:make_task",
            "objective": {
                "metrics": ["accuracy", "size_bytes", "custom_objective:knn_accuracy"],
                "constraints": ["size_bytes <= 20000"],
            },
        }
    )
    task, space, objective = build(exp)
    assert task.spec == "custom_objective:make_task" and task.metric_name == "cosine"
    assert task.kind == "regression"
    assert objective.names == ["accuracy", "size_bytes", "knn_accuracy"]
    assert objective.directions == ["maximize", "minimize", "maximize"]
    assert [str(c) for c in objective.constraints] == ["size_bytes <= 20000"]
    assert {"fc1", "fc2", "out"} <= set(space.layer_names)
    knn = get_metric("custom_objective:knn_accuracy")
    teacher = task.teacher()
    assert task.evaluate(teacher, "val")["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert 0.9 < knn(teacher, None, task, split="test") <= 1.0
