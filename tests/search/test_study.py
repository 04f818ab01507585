"""The Optuna side without Ray: the journal study, log-scaled values, the warm start."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import optuna
import pytest

from autocompress import get_task
from autocompress.objectives import Metric, Objective
from autocompress.search._common import STUDY_FILE, STUDY_NAME
from autocompress.search._journal import study_storage, sync_journal
from autocompress.search._searcher import (
    CLASSIC,
    ConstrainedOptunaSearch,
    SpaceFn,
    baseline_params,
    default_baselines,
    warm_start_size,
)
from autocompress.spaces import CompressionSpace, Knobs, Plan


def _space() -> CompressionSpace:
    model = get_task("digits-mlp").build_model()
    knobs = Knobs(sparsity=(0.3, 0.97), sparsity_step=0.01, bits=(2, 3, 4, 8), width=(0.1, 1.0))
    return CompressionSpace.from_model(model, knobs)


def _searcher(
    space: CompressionSpace, run_dir: Path, sampler: object, log_metrics: list[str] | None = None
) -> ConstrainedOptunaSearch:
    """The product's searcher on (accuracy max, size_bytes min) with the run's journal study."""
    return ConstrainedOptunaSearch(
        SpaceFn(space),
        metric=["accuracy", "size_bytes"],
        mode=["max", "min"],
        sampler=sampler,
        study_name=STUDY_NAME,
        storage=study_storage(run_dir),
        log_metrics=log_metrics or (),
    )


def test_journal_cut_by_a_kill_is_trimmed_and_appendable(tmp_path: Path) -> None:
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=study_storage(tmp_path), directions=["maximize"]
    )
    for x in (1.0, 2.0):
        t = study.ask()
        t.suggest_float("x", 0, 1)
        study.tell(t, x)
    journal = tmp_path / STUDY_FILE
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "cut')  # a write cut by SIGKILL
    Path(f"{journal}.lock").write_text("")  # and the lock the killed driver held
    again = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(tmp_path))
    assert journal.read_bytes() == whole and not Path(f"{journal}.lock").exists()
    t = again.ask()
    t.suggest_float("x", 0, 1)
    again.tell(t, 3.0)
    reread = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(tmp_path, writer=False))
    assert [tr.value for tr in reread.trials] == [1.0, 2.0, 3.0]


def test_driver_journal_pickles_and_appends_without_lock_files(tmp_path: Path) -> None:
    storage = pickle.loads(pickle.dumps(study_storage(tmp_path)))  # Tune pickles the searcher
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STUDY_FILE]  # no lock file
    sync_journal(tmp_path)
    reread = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(tmp_path, writer=False))
    assert [t.params for t in reread.trials] == [t.params for t in study.trials]


def test_reader_changes_nothing(tmp_path: Path) -> None:
    journal = tmp_path / STUDY_FILE
    journal.write_bytes(b'{"op_code": 0')
    study_storage(tmp_path, writer=False)
    assert journal.read_bytes() == b'{"op_code": 0'


def test_sizes_are_told_to_optuna_as_log10(tmp_path: Path) -> None:
    obj = Objective(["accuracy", "size_bytes"], ["accuracy_drop <= 0.01"])
    assert obj.log_scaled == ["size_bytes"]
    assert Objective(["accuracy", "size_bytes"], weights={"accuracy": 1.0}).log_scaled == []
    space = _space()
    searcher = _searcher(space, tmp_path, optuna.samplers.NSGAIISampler(seed=0), obj.log_scaled)
    config = searcher.suggest("t1")
    assert "plan_json" in config
    result = {"status": "COMPLETE", "accuracy": 0.9, "size_bytes": 2500.0, "cv_0": -0.01}
    searcher.on_trial_complete("t1", result)
    assert result["size_bytes"] == 2500.0  # the reported result itself is left alone
    (trial,) = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(tmp_path)).trials
    assert trial.values == [0.9, pytest.approx(math.log10(2500.0))]
    assert trial.constraints == {"0": -0.01}


def test_study_carries_names_units_constraints_and_trial_ids(tmp_path: Path) -> None:
    """What optuna-dashboard shows: named metrics with units, constraints, Tune trial ids."""
    searcher = ConstrainedOptunaSearch(
        SpaceFn(_space()),
        metric=["accuracy", "size_bytes"],
        mode=["max", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0),
        study_name=STUDY_NAME,
        storage=study_storage(tmp_path),
        log_metrics=["size_bytes"],
        constraint_names=["accuracy_drop <= 0.01", "size_bytes <= 3000"],
    )
    searcher.suggest("tune_a")
    searcher.suggest("tune_b")
    result = {"status": "COMPLETE", "accuracy": 0.9, "size_bytes": 2500.0, "feasible": False}
    searcher.on_trial_complete("tune_a", {**result, "cv_0": 0.5, "cv_1": -0.2})
    searcher.on_trial_complete("tune_b", {"status": "FAILED", "accuracy": None})
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(tmp_path, writer=False))
    assert study.metric_names == ["accuracy", "size_bytes"]
    assert study.user_attrs["units"] == {"accuracy": "task score", "size_bytes": "log10(bytes)"}
    done, failed = study.trials
    assert done.user_attrs["trial_id"] == "tune_a" and failed.user_attrs["trial_id"] == "tune_b"
    assert done.system_attrs["constraints"] == [0.5, -0.2]  # the list form the dashboard reads
    assert done.constraints == {"0": 0.5, "1": -0.2}  # and Optuna's samplers
    assert done.user_attrs["constraints"] == {
        "accuracy_drop <= 0.01": 0.5,
        "size_bytes <= 3000": -0.2,
    }
    assert done.user_attrs["metrics"] == {"accuracy": 0.9, "size_bytes": 2500.0}
    assert done.user_attrs["feasible"] is False
    assert done.values == [0.9, pytest.approx(math.log10(2500.0))]


def test_metric_scale_is_validated() -> None:
    assert Metric("m", "minimize", lambda *a: 1.0, scale="log").scale == "log"
    with pytest.raises(Exception, match="scale='ln' is unknown"):
        Metric("m", "minimize", lambda *a: 1.0, scale="ln")


def test_warm_start_spreads_uniform_plans_over_the_space() -> None:
    space = _space()
    assert warm_start_size(20) == 3 and warm_start_size(100) == 10 and warm_start_size(10**4) == 16
    plans = default_baselines(space, 10, seed=0)
    assert len(plans) == 10
    assert plans[: len(CLASSIC)] == [space.uniform(sparsity=s, bits=b) for s, b in CLASSIC]
    for p in plans:  # uniform: every layer has the same knobs
        assert len({(lp.sparsity, lp.bits) for lp in p.layers.values()}) == 1
    spread = plans[len(CLASSIC) :]
    widths = [p.width for p in spread]
    assert min(widths) < 0.35 and max(widths) > 0.7  # narrow and wide students both tried
    assert {next(iter(p.layers.values())).bits for p in spread} >= {2, 8}
    points = baseline_params(space, plans, strict=False)
    assert len(points) == 10 and all(0.1 <= p["width"] <= 1.0 for p in points)
    assert default_baselines(space, 10, seed=0) == plans  # deterministic per seed
    assert default_baselines(space, 10, seed=1) != plans
    assert isinstance(plans[-1], Plan)


def test_repeated_plans_are_sent_back_to_the_sampler(tmp_path: Path) -> None:
    model = get_task("digits-mlp").build_model()
    knobs = Knobs(sparsity=None, bits=(2, 4))
    groups = [["fc1", "fc2", "fc3"]]  # one knob: two plans in the whole space
    space = CompressionSpace.from_model(model, knobs, groups=groups)
    searcher = _searcher(space, tmp_path, optuna.samplers.RandomSampler(seed=0))
    seen = []
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        seen.append(config["plan_json"])
        result = {"status": "COMPLETE", "accuracy": 0.9, "size_bytes": 1000.0 + i}
        searcher.on_trial_complete(f"t{i}", {**result, "duplicate_of": ""})
    assert seen[0] != seen[1]  # the repeat of t0's plan was resampled, not run
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(tmp_path))
    repeats = [t for t in study.trials if "repeat_of" in t.user_attrs]
    assert repeats and all(t.user_attrs["repeat_of"] in ("t0", "t1") for t in repeats)
    assert all(t.state == optuna.trial.TrialState.FAIL for t in repeats)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3  # t2 had nothing new left: it ran as a duplicate of t0 or t1
    before = len(study.trials)
    searcher.suggest("t3")  # the space is exhausted: asked twice, not eleven times
    after = optuna.load_study(study_name=STUDY_NAME, storage=study_storage(tmp_path)).trials
    assert len(after) - before <= 2
