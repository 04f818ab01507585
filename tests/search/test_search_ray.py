"""Integration tests of the search driver: real Ray (2 CPUs), real torch, digits-mlp."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from raykit import descendants, kill_pids, private_ray

from autocompress import AutocompressError, ConfigError, FinetuneSettings, Task
from autocompress.objectives import Metric, Objective
from autocompress.search import SearchResult, run
from autocompress.spaces import CompressionSpace, Knobs, Plan

HERE = Path(__file__).resolve().parent
FT = FinetuneSettings(epochs=3)


def _space(task: Task, **kw) -> CompressionSpace:
    knobs = kw.pop("knobs", Knobs(sparsity=(0.5, 0.95), bits=(2, 4, 8)))
    return CompressionSpace.from_model(task.teacher(), knobs, finetune=kw.pop("ft", FT), **kw)


def flaky(model, artifact, task) -> float:
    """Raises for 2-bit plans, NaN for 8-bit plans (imported by the Ray workers)."""
    plan = json.loads((Path(artifact.path) / "plan.json").read_text())
    bits = plan["layers"]["fc1"]["bits"]
    if bits == 2:
        raise RuntimeError("flaky metric boom")
    return math.nan if bits == 8 else 1.0


# --- validation (runs first, before any Ray exists in this process) -------------------------
def test_bad_inputs_raise_before_ray(digits_mlp: Task, tmp_path: Path) -> None:
    import ray

    was_up = ray.is_initialized()
    space = _space(digits_mlp)
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    bad = [
        ({"sampler": "cmaes"}, "sampler='cmaes' is unknown"),
        ({"workers": 0}, "workers=0"),
        ({"trials": 0}, "trials=0"),
        ({"keep_artifacts": "some"}, "keep_artifacts"),
        ({"time_budget": -1}, "time_budget"),
        ({"address": "no address"}, "address"),
        ({"run_dir": used}, "pass resume=True"),
        ({"run_dir": tmp_path / "fresh", "resume": True}, "holds no run"),
        ({"baselines": [Plan.uniform(["fc1", "fc2", "fc3"], bits=6)]}, "baselines\\[0\\]"),
    ]
    for kwargs, match in bad:
        kwargs.setdefault("run_dir", tmp_path / "r")
        with pytest.raises(ConfigError, match=match):
            run(digits_mlp, space, progress=False, **kwargs)
    with pytest.raises(ConfigError, match="unknown metric"):
        run(digits_mlp, space, Objective(["accuracy"], ["acc_drop <= 0.01"]), run_dir=tmp_path)
    if not was_up:  # an unreachable cluster fails fast, before anything is written
        with pytest.raises(AutocompressError, match="cannot reach the Ray cluster"):
            run(digits_mlp, space, address="127.0.0.1:1", run_dir=tmp_path / "a", progress=False)
        assert not (tmp_path / "a").exists()
    assert ray.is_initialized() == was_up  # nothing above started Ray
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "gp", "random"])
def test_samplers_drive_the_space_with_constraints(digits_mlp: Task, sampler: str) -> None:
    from autocompress.search._searcher import (
        SpaceFn,
        baseline_params,
        default_baselines,
        make_sampler,
    )

    space = _space(digits_mlp)
    points = baseline_params(space, default_baselines(space), strict=False)
    assert points[0] == {
        f"fc{i}.{k}": v for i in (1, 2, 3) for k, v in (("sparsity", 0.8), ("bits", 4))
    }  # 6 bits -> nearest 4
    assert points[2]["fc1.sparsity"] == 0.5  # 0.0 clipped into the space's range
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=make_sampler(sampler, 0, 20)
    )
    for p in points:
        study.enqueue_trial(p)
    fn = SpaceFn(space)
    plans = []
    for _ in range(12):
        trial = study.ask()
        plan = Plan.from_json(fn(trial)["plan_json"])
        plans.append(plan)
        sparsity = sum(lp.sparsity for lp in plan.layers.values())
        trial.set_constraint("c0", 2.0 - sparsity)
        study.tell(trial, [sparsity, sum(lp.bits for lp in plan.layers.values())])
    assert plans[0] == space.uniform(sparsity=0.8, bits=4)
    assert all(t.constraints["c0"] <= 0 for t in study.best_trials)
    with pytest.raises(ConfigError, match="does not lie in the search space"):
        baseline_params(space, [space.uniform(sparsity=0.3, bits=4)], strict=True)


# --- real searches -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    with private_ray(HERE):  # workers can import this module (for `flaky`)
        yield


def _brute_front(trials: pd.DataFrame, names: list[str], directions: list[str]) -> set[str]:
    ok = trials[
        (trials["status"] == "COMPLETE") & trials["feasible"] & (trials["duplicate_of"] == "")
    ]
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    rows = [
        (r["trial_id"], np.array([r[n] for n in names], dtype=float) * signs)
        for _, r in ok.iterrows()
    ]
    front = set()
    for tid, a in rows:
        if not any((b <= a).all() and (b < a).any() for _, b in rows):
            front.add(tid)
    return front


def test_search_front_artifacts_and_reload(ray_cluster, digits_mlp: Task, tmp_path: Path) -> None:
    rd = tmp_path / "run"
    t0 = time.monotonic()
    result = run(digits_mlp, _space(digits_mlp), trials=8, workers=2, run_dir=rd, progress=False)
    took = time.monotonic() - t0
    trials, pareto = result.trials, result.pareto
    assert len(trials) == 8 and trials["trial_id"].is_unique
    assert (trials["status"] == "COMPLETE").all(), trials[["status", "reason"]]
    for col in (
        "fc1.sparsity",
        "fc1.bits",
        "width",
        "accuracy",
        "size_bytes",
        "accuracy_drop",
        "compression_ratio",
        "feasible",
        "violation",
        "duration_s",
    ):
        assert col in trials.columns
    assert set(pareto["trial_id"]) == _brute_front(trials, result.names, result.directions)
    assert len(pareto) >= 1 and pareto["feasible"].all()
    assert (pareto["accuracy_drop"] <= 0.01 + 1e-12).all()
    for _, row in pareto.iterrows():  # the artifact on disk is the model that was scored
        model = result.load_model(row["trial_id"])
        assert digits_mlp.evaluate(model, "val")["accuracy"] == pytest.approx(row["accuracy"])
        assert digits_mlp.evaluate(model, "test")["accuracy"] == pytest.approx(row["test_accuracy"])
        assert (rd / row["artifact"] / "manifest.json").is_file()
    assert not (rd / "trials").exists()  # keep_artifacts="pareto"
    for name in ("trials.csv", "pareto.csv", "result.json", "run.json", "optuna.journal"):
        assert (rd / name).is_file()
    run_json = json.loads((rd / "run.json").read_text())
    assert run_json["teacher"]["val"]["accuracy"] > 0.9 and run_json["teacher"]["size_bytes"] > 0
    assert result.teacher["size_bytes"] == run_json["teacher"]["size_bytes"]
    again = SearchResult.load(rd)
    pd.testing.assert_frame_equal(again.trials, trials)
    pd.testing.assert_frame_equal(again.pareto, pareto)
    hv = again.hypervolume_history()
    assert (
        len(hv) == 8 and (np.diff(hv["hypervolume"]) >= 0).all() and hv["hypervolume"].iloc[-1] > 0
    )
    out = result.export(pareto["trial_id"].iloc[0], tmp_path / "exported")
    assert (out / "weights.safetensors").is_file()
    assert "front" in result.summary()
    study = SearchResult.load(rd).study()
    told = [t for t in study.trials if "repeat_of" not in t.user_attrs]
    assert len(told) == 8 and all("0" in t.constraints for t in told)
    print(
        f"\n8 trials on 2 workers: {took:.1f}s total, median trial "
        f"{trials['duration_s'].median():.2f}s"
    )


def test_failed_and_duplicate_trials(ray_cluster, digits_mlp: Task, tmp_path: Path) -> None:
    knobs = Knobs(sparsity=(0.6, 0.6), bits=(2, 4, 8))  # tied layers: only 3 distinct plans
    space = _space(digits_mlp, knobs=knobs, groups=[("fc1", "fc2", "fc3")])
    objective = Objective(["accuracy", "size_bytes", Metric("flaky", "minimize", flaky)], [])
    base = [space.uniform(sparsity=0.6, bits=b) for b in (2, 4, 8)]
    result = run(
        digits_mlp,
        space,
        objective,
        trials=6,
        workers=1,
        sampler="random",
        baselines=base,
        run_dir=tmp_path / "run",
        progress=False,
    )
    t = result.trials
    assert len(t) == 6 and t["trial_id"].is_unique  # the budget is finished
    by_bits = {b: t[t["fc1.bits"] == b] for b in (2, 4, 8)}
    assert (by_bits[2]["status"] == "FAILED").all()
    assert by_bits[2]["reason"].str.contains("RuntimeError: flaky metric boom").all()
    assert (by_bits[8]["status"] == "FAILED").all()
    assert by_bits[8]["reason"].str.contains("'flaky' is nan").all()
    assert (by_bits[4]["status"] == "COMPLETE").all()
    assert set(result.pareto["trial_id"]) == {by_bits[4]["trial_id"].iloc[0]}
    dups = t[t["duplicate_of"] != ""]
    assert len(dups) == 3  # 6 trials over 3 plans: the last 3 reuse the first results
    for _, row in dups.iterrows():
        orig = t[t["trial_id"] == row["duplicate_of"]].iloc[0]
        assert row["status"] == orig["status"] and row["reason"] == orig["reason"]
        assert row["plan_json"] == orig["plan_json"] and row["duration_s"] == 0.0
    study = SearchResult.load(tmp_path / "run").study()
    states = [t.state for t in study.trials if "repeat_of" not in t.user_attrs]
    assert states.count(optuna.trial.TrialState.FAIL) == 4
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2


def test_impossible_constraint_names_closest(ray_cluster, digits_mlp: Task, tmp_path: Path) -> None:
    objective = Objective(["accuracy", "size_bytes"], ["size_bytes <= 10"])
    result = run(
        digits_mlp,
        _space(digits_mlp),
        objective,
        trials=3,
        workers=2,
        run_dir=tmp_path / "run",
        progress=False,
    )
    t = result.trials
    assert result.pareto.empty and not t["feasible"].any()
    closest = t.loc[t["size_bytes"].idxmin(), "trial_id"]
    assert result.info["closest"]["trial_id"] == closest
    assert "no trial satisfies the constraints" in result.message
    assert f"closest is trial {closest}" in result.message and "size_bytes=" in result.message
    assert result.message in result.summary()
    assert SearchResult.load(tmp_path / "run").message == result.message


# --- resume after the driver is killed ---------------------------------------------------
RESUME_SCRIPT = """
import sys
from autocompress import FinetuneSettings
from autocompress.search import run
from autocompress.spaces import CompressionSpace, Knobs
from autocompress.tasks import get_task

task = get_task("digits-mlp")
space = CompressionSpace.from_model(
    task.teacher(), Knobs(sparsity=(0.5, 0.95), bits=(2, 4, 8)),
    finetune=FinetuneSettings(epochs=60, patience=60),
)
run(task, space, trials=6, workers=2, run_dir=sys.argv[1], progress=False)
"""


def test_resume_after_sigkill(ray_cluster, digits_mlp: Task, tmp_path: Path) -> None:
    rd = tmp_path / "run"
    script = tmp_path / "search.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(rd)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    records = rd / "records"
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if records.is_dir() and len(list(records.glob("*.json"))) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        time.sleep(1.5)  # let Tune write its state (TUNE_GLOBAL_CHECKPOINT_S=1)
        pids = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=30)
    finally:
        kill_pids([proc.pid, *pids])  # only the processes the killed search started
    before = {p.stem: json.loads(p.read_text()) for p in records.glob("*.json")}
    finished = {k: r for k, r in before.items() if r["status"] == "COMPLETE"}
    assert len(finished) >= 2 and len(before) < 6
    assert not (rd / "result.json").exists()

    space = _space(digits_mlp, ft=FinetuneSettings(epochs=60, patience=60))
    result = run(digits_mlp, space, trials=6, workers=2, run_dir=rd, resume=True, progress=False)
    t = result.trials
    assert len(t) == 6 and t["trial_id"].is_unique
    assert t["status"].isin(["COMPLETE", "FAILED"]).all()
    assert (t["finished_at"] > killed_at).sum() >= 6 - len(before)  # the rest ran after resume
    for tid, rec in finished.items():  # kept as they were, not recomputed
        row = t[t["trial_id"] == tid].iloc[0]
        assert row["status"] == "COMPLETE" and row["accuracy"] == rec["values"]["accuracy"]
        assert row["finished_at"] == pytest.approx(rec["finished_at"], abs=1e-3)
    study = SearchResult.load(rd).study()
    states = [s.state for s in study.trials if "repeat_of" not in s.user_attrs]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert optuna.trial.TrialState.RUNNING not in states  # left by the kill, then marked FAIL
    with pytest.raises(ConfigError, match="differs"):
        run(digits_mlp, _space(digits_mlp), trials=6, run_dir=rd, resume=True, progress=False)


def test_early_stop_ends_hopeless_fine_tunes(ray_cluster, digits_mlp: Task, tmp_path: Path) -> None:
    from autocompress import EarlyStop

    knobs = Knobs(sparsity=(0.5, 0.97), sparsity_step=0.01, bits=(2, 8), width=(0.1, 1.0))
    space = _space(digits_mlp, knobs=knobs, ft=FinetuneSettings(epochs=9, patience=9))
    hopeless = space.uniform(sparsity=0.97, bits=2, width=0.1)
    fine = space.uniform(sparsity=0.5, bits=8)
    result = run(
        digits_mlp,
        space,
        trials=2,
        workers=2,
        baselines=[hopeless, fine],
        early_stop=EarlyStop(after=0.34, margin=0.05),
        run_dir=tmp_path / "run",
        progress=False,
    )
    t = result.trials.set_index("width")
    assert t.loc[0.1, "status"] == "COMPLETE" and not t.loc[0.1, "feasible"]
    assert 3 <= t.loc[0.1, "early_stopped"] < 9  # stopped a third of the way in
    assert math.isnan(t.loc[1.0, "early_stopped"]) and t.loc[1.0, "feasible"]
    assert set(result.pareto["width"]) == {1.0}
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["settings"]["early_stop"] == {"after": 0.34, "margin": 0.05}


def test_one_seed_one_worker_same_trials_and_a_readable_study(
    ray_cluster, digits_mlp: Task, tmp_path: Path
) -> None:
    """Same seed, one worker: the same plans in the same order (NSGA-II's second generation
    depends on the first one's scores, so this also needs deterministic trials). The study is
    what optuna-dashboard shows: metric names, units, constraints, Tune trial ids."""
    space = _space(digits_mlp, ft=FinetuneSettings(epochs=2))
    kw = {"trials": 9, "workers": 1, "seed": 7, "sampler": "nsga2", "progress": False}
    a, b = (run(digits_mlp, space, run_dir=tmp_path / name, **kw) for name in ("a", "b"))
    assert list(a.trials["plan_json"]) == list(b.trials["plan_json"])
    assert list(a.trials["accuracy"]) == list(b.trials["accuracy"])
    assert a.trials["plan_json"].nunique() >= 6
    study = a.study()
    assert study.metric_names == ["accuracy", "size_bytes"]
    assert study.user_attrs["units"] == {"accuracy": "task score", "size_bytes": "log10(bytes)"}
    ran = [t for t in study.trials if "repeat_of" not in t.user_attrs]
    assert sorted(t.user_attrs["trial_id"] for t in ran) == sorted(a.trials["trial_id"])
    done = [t for t in ran if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == (a.trials["status"] == "COMPLETE").sum() > 0
    for t in done:
        row = a.trials[a.trials["trial_id"] == t.user_attrs["trial_id"]].iloc[0]
        assert list(t.user_attrs["constraints"]) == ["accuracy_drop <= 0.01"]
        assert t.system_attrs["constraints"] == list(t.user_attrs["constraints"].values())
        assert t.user_attrs["feasible"] == bool(row["feasible"])
        assert t.user_attrs["metrics"]["size_bytes"] == row["size_bytes"]
