"""Faults inside trials: exceptions, non-finite metrics and losses, hangs, SIGKILLed workers.

Real Ray (2 CPUs), real torch, digits-mlp. The faults come from metrics and a task in
``faultkit`` (imported by the workers); a worker is killed with a real SIGKILL by PID.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
from rkit import brute_front, wait_for

from autocompress import FinetuneSettings, Task
from autocompress.objectives import Metric, Objective
from autocompress.search import SearchResult, run
from autocompress.spaces import CompressionSpace, Knobs

FT = FinetuneSettings(epochs=2, patience=2)


def _tied_space(task: Task, bits: tuple[int, ...], sparsity: tuple[float, float]):
    knobs = Knobs(sparsity=sparsity, sparsity_step=0.3, bits=bits)
    return CompressionSpace.from_model(
        task.teacher(), knobs, finetune=FT, groups=[("fc1", "fc2", "fc3")]
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_raise_inf_and_hang_are_failed_with_reasons(
    ray_local, digits_mlp: Task, tmp_path: Path, tally
) -> None:
    import faultkit

    space = _tied_space(digits_mlp, (2, 4, 8), (0.6, 0.9))
    plans = [space.uniform(sparsity=s, bits=b) for b in (2, 4, 8) for s in (0.6, 0.9)]
    objective = Objective(["accuracy", "size_bytes", Metric("mixed", "minimize", faultkit.mixed)])
    t0 = time.monotonic()
    result = run(
        digits_mlp,
        space,
        objective,
        trials=6,
        workers=2,
        sampler="random",
        baselines=plans,
        trial_timeout=4.0,
        run_dir=tmp_path / "run",
        progress=False,
    )
    tally["faults injected"] += 5  # 2 raising, 1 inf, 1 hung trial; each plan once
    t = result.trials
    assert len(t) == 6 and t["trial_id"].is_unique  # the search went on to its budget
    by = {(r["fc1.bits"], r["fc1.sparsity"]): r for _, r in t.iterrows()}
    for s in (0.6, 0.9):
        assert by[2, s]["status"] == "FAILED"
        assert by[2, s]["reason"] == "RuntimeError: injected metric failure"
        assert by[4, s]["status"] == "COMPLETE"
    assert by[8, 0.6]["status"] == "FAILED" and "'mixed' is inf" in by[8, 0.6]["reason"]
    hung = by[8, 0.9]
    assert hung["status"] == "FAILED", hung
    assert "still running after 18s, over trial_timeout=4.0s" in hung["reason"]
    assert time.monotonic() - t0 < 120
    pids = [int(p.read_text()) for p in (tmp_path / "ctl").glob("hung-*")]
    assert len(pids) == 1 and not _alive(pids[0])  # the hung worker process was ended
    failed = set(t.loc[t["status"] == "FAILED", "trial_id"])
    assert not failed & set(result.pareto["trial_id"])  # failed trials never enter the front
    assert set(result.pareto["trial_id"]) == brute_front(t, result.names, result.directions)
    assert (t.loc[t["status"] == "FAILED", ["accuracy", "size_bytes"]].isna()).all().all()
    study = SearchResult.load(tmp_path / "run").study()
    states = [s.state for s in study.trials if "repeat_of" not in s.user_attrs]
    assert states.count(optuna.trial.TrialState.FAIL) == 4
    assert optuna.trial.TrialState.RUNNING not in states


def test_nan_loss_fails_every_trial_cleanly(ray_local, tmp_path: Path, tally) -> None:
    import faultkit

    task = faultkit.nan_data_task()
    space = CompressionSpace.from_model(
        task.teacher(), Knobs(sparsity=(0.5, 0.9), bits=(4, 8)), finetune=FT
    )
    result = run(task, space, trials=2, workers=2, run_dir=tmp_path / "run", progress=False)
    tally["faults injected"] += 2
    t = result.trials
    assert len(t) == 2 and (t["status"] == "FAILED").all()
    assert t["reason"].str.startswith("FinetuneDiverged: fine-tune loss became nan").all()
    assert result.pareto.empty
    assert result.message.startswith("no trial finished (first failure, trial ")


@pytest.mark.parametrize("max_failures", [0, 1])
def test_worker_sigkill_mid_trial(
    ray_local, digits_mlp: Task, tmp_path: Path, max_failures: int, tally
) -> None:
    import faultkit

    space = _tied_space(digits_mlp, (4, 8), (0.6, 0.9))
    plans = [space.uniform(sparsity=s, bits=b) for b in (4, 8) for s in (0.6, 0.9)][:3]
    objective = Objective(["accuracy", "size_bytes", Metric("k", "minimize", faultkit.killable)])
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    (ctl / "arm").write_text("")
    killed: dict[str, float] = {}

    def killer() -> None:  # SIGKILL the worker that claimed the arm, by the PID it wrote
        pid = int(
            wait_for(
                lambda: (ctl / "pid").is_file() and (ctl / "pid").read_text(),
                240,
                "a trial to block in the killable metric",
            )
        )
        os.kill(pid, signal.SIGKILL)
        killed["at"], killed["pid"] = time.time(), pid
        (ctl / "release").write_text("")

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    result = run(
        digits_mlp,
        space,
        objective,
        trials=3,
        workers=2,
        sampler="random",
        baselines=plans,
        max_failures=max_failures,
        run_dir=tmp_path / "run",
        progress=False,
    )
    th.join(timeout=5)
    tally["faults injected"] += 1
    assert killed, "the worker was never killed"
    t = result.trials
    assert len(t) == 3 and t["trial_id"].is_unique  # the run completed its budget
    armed = next(ctl.glob("armed-*"))
    victim_pid = int(armed.name.removeprefix("armed-"))
    assert victim_pid == killed["pid"] and not _alive(victim_pid)
    if max_failures == 0:  # marked failed, with the crash as its reason
        bad = t[t["status"] == "FAILED"]
        assert len(bad) == 1 and bad["reason"].iloc[0].startswith("crashed:"), bad
        assert (t["status"] == "COMPLETE").sum() == 2
        assert bad["trial_id"].iloc[0] not in set(result.pareto["trial_id"])
    else:  # retried on a new worker and finished
        assert (t["status"] == "COMPLETE").all(), t[["status", "reason"]]
        assert (t["finished_at"] > killed["at"]).sum() >= 1
