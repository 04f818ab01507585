"""The driver killed (SIGKILL) at several points, interrupted (SIGINT/SIGTERM), then resumed.

Every session is a real ``autocompress run`` process; each kill is a real signal sent when a
condition is seen on disk. Orphans of a killed driver (Ray's processes) are killed by PID.
After the last resume the invariants of :func:`rkit.check_run` must hold: the budget is met,
no finished trial is lost or run again, artifacts are unchanged, the front is the front of
the trials table, no temporary file is left.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from rkit import artifact_hashes, check_run, cli, records, write_experiment

TRIALS = 6


def _n_records(rd: Path) -> int:
    return len(list((rd / "records").glob("*.json")))


def _tmp_in_trials(rd: Path) -> bool:
    try:
        return any(e.name.startswith(".") for e in os.scandir(rd / "trials"))
    except OSError:
        return False


def _run(drivers, exp: Path, rd: Path, log: Path, resume: bool = False):
    args = [*cli(), "run", str(exp), "--run-dir", str(rd)] + (["--resume"] if resume else [])
    return drivers(args, log)


def _snapshot(rd: Path) -> tuple[dict, dict]:
    return records(rd), artifact_hashes(rd)


def _resume_to_end(drivers, exp: Path, rd: Path, log: Path, tally) -> str:
    drv = _run(drivers, exp, rd, log, resume=True)
    rc = drv.wait(timeout=900)
    tally["runs resumed"] += 1
    assert rc == 0, drv.output()[-3000:]
    return drv.output()


@pytest.mark.parametrize(
    "then_sigkill", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["", "then-sigkill"]
)
def test_sigint_saves_then_resume_completes(
    drivers, tmp_path: Path, then_sigkill: bool, tally
) -> None:
    # Two interrupted sessions need trials left for the second one even when a loaded machine
    # finishes the in-flight trials of the first after its Ctrl-C: a larger budget then.
    n = 2 * TRIALS if then_sigkill else TRIALS
    exp = write_experiment(tmp_path / "exp.yaml", trials=n, epochs=4, keep_artifacts="all")
    rd = tmp_path / "run"

    drv = _run(drivers, exp, rd, tmp_path / "s1.log")  # session 1: Ctrl-C after 2 trials
    drv.poll_until(lambda: _n_records(rd) >= 2, 600, "2 finished trials")
    drv.signal(signal.SIGINT)
    rc = drv.wait(timeout=300)
    tally["faults injected"] += 1
    out = drv.output()
    assert rc == 0, out[-3000:]
    assert "interrupted after" in out and "resume with --resume" in out
    assert "Traceback" not in out
    info = json.loads((rd / "result.json").read_text())
    assert info["interrupted"] is True
    from autocompress.search import SearchResult

    partial = SearchResult.load(rd)  # the results so far are saved and readable
    done = partial.trials[partial.trials["status"].isin(["COMPLETE", "FAILED"])]
    assert 2 <= len(done) < n
    assert set(done["trial_id"]) <= set(records(rd))
    for tid in partial.pareto["trial_id"]:
        partial.load_model(tid)

    if then_sigkill:  # session 2: resumed, then SIGKILLed after one more trial
        drv = _run(drivers, exp, rd, tmp_path / "s2.log", resume=True)
        n0 = _n_records(rd)
        drv.poll_until(lambda: _n_records(rd) > n0, 600, "one more finished trial")
        drv.signal(signal.SIGKILL)
        drv.close()
        tally["faults injected"] += 1
        tally["runs resumed"] += 1
    before, arts = _snapshot(rd)
    assert len(before) < n, "the run finished before the kill: nothing was tested"

    _resume_to_end(drivers, exp, rd, tmp_path / "s3.log", tally)  # session 3: to the end
    got = check_run(rd, n, before, arts)
    assert got["kept"] == sum(r["status"] in ("COMPLETE", "FAILED") for r in before.values())
    assert json.loads((rd / "result.json").read_text())["interrupted"] is False


# --- a matrix of kill points (slow: one full run and one resume each) -------------------------
def _startup(rd: Path) -> bool:
    return rd.is_dir() and not (rd / "run.json").is_file()


POINTS = {
    # during start-up: teacher export, before run.json exists
    "startup": (_startup, 0.002),
    # after the first trial finished
    "first-record": (lambda rd: _n_records(rd) >= 1, 0.05),
    # while a trial's artifact is being written (its temporary directory exists)
    "artifact-write": (lambda rd: _n_records(rd) >= 2 and _tmp_in_trials(rd), 0.002),
    # with most trials done, two in flight
    "late": (lambda rd: _n_records(rd) >= TRIALS - 2, 0.05),
    # during finalize: right after pareto/ appears (the tables may not be written yet)
    "finalize": (lambda rd: (rd / "pareto").is_dir(), 0.002),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("keep", ["all", "pareto"])
def test_sigkill_at_point_then_resume(drivers, tmp_path: Path, point: str, keep: str, tally):
    cond, dt = POINTS[point]
    exp = write_experiment(tmp_path / "exp.yaml", trials=TRIALS, epochs=4, keep_artifacts=keep)
    rd = tmp_path / "run"
    drv = _run(drivers, exp, rd, tmp_path / "s1.log")
    drv.poll_until(lambda: cond(rd), 900, f"kill point {point!r}", dt=dt)
    drv.signal(signal.SIGKILL)
    drv.close()
    tally["faults injected"] += 1
    before, arts = _snapshot(rd)
    _resume_to_end(drivers, exp, rd, tmp_path / "s2.log", tally)
    check_run(rd, TRIALS, before, arts)


@pytest.mark.slow
def test_repeated_sigkills_then_resume(drivers, tmp_path: Path, tally) -> None:
    """Kill three sessions in a row, each after one more finished trial, then finish."""
    exp = write_experiment(tmp_path / "exp.yaml", trials=TRIALS, epochs=4, keep_artifacts="all")
    rd = tmp_path / "run"
    snapshots = []
    for i in range(3):
        drv = _run(drivers, exp, rd, tmp_path / f"s{i}.log", resume=i > 0)
        n0 = _n_records(rd)
        drv.poll_until(lambda n0=n0: _n_records(rd) > n0, 900, "one more finished trial")
        drv.signal(signal.SIGKILL)
        drv.close()
        tally["faults injected"] += 1
        tally["runs resumed"] += i > 0
        snapshots.append(_snapshot(rd))
    _resume_to_end(drivers, exp, rd, tmp_path / "end.log", tally)
    for before, arts in snapshots:
        check_run(rd, TRIALS, before, arts)


@pytest.mark.slow
def test_sigterm_stops_gracefully_then_resume(drivers, tmp_path: Path, tally) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", trials=TRIALS, epochs=4)
    rd = tmp_path / "run"
    drv = _run(drivers, exp, rd, tmp_path / "s1.log")
    drv.poll_until(lambda: _n_records(rd) >= 2, 600, "2 finished trials")
    drv.signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert drv.wait(timeout=300) == 0, drv.output()[-3000:]
    tally["faults injected"] += 1
    assert time.monotonic() - t0 < 120
    assert "interrupted after" in drv.output()
    before, arts = _snapshot(rd)
    _resume_to_end(drivers, exp, rd, tmp_path / "s2.log", tally)
    check_run(rd, TRIALS, before, arts)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated-state", "no-state"])
def test_resume_without_usable_tune_state_adopts_every_finished_trial(
    drivers, tmp_path: Path, damage: str, tally
) -> None:
    """Tune's saved state is damaged (killed mid-write) or absent (killed before its first
    save): the resumed run starts a new experiment that adopts every finished record."""
    exp = write_experiment(tmp_path / "exp.yaml", trials=TRIALS, epochs=4, keep_artifacts="all")
    rd = tmp_path / "run"
    drv = _run(drivers, exp, rd, tmp_path / "s1.log")
    drv.poll_until(lambda: _n_records(rd) >= 3, 900, "3 finished trials")
    drv.signal(signal.SIGKILL)
    drv.close()
    tally["faults injected"] += 2
    state = sorted((rd / "tune").glob("experiment_state-*.json"))[-1]
    if damage == "truncated-state":  # as if the kill had landed while Tune copied it
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        for p in (rd / "tune").glob("experiment_state-*.json"):
            p.unlink()
    before, arts = _snapshot(rd)
    _resume_to_end(drivers, exp, rd, tmp_path / "s2.log", tally)
    got = check_run(rd, TRIALS, before, arts)
    finished = [r for r in before.values() if r["status"] in ("COMPLETE", "FAILED")]
    assert got["kept"] == len([r for r in finished if not r.get("duplicate_of")])
    adopted = [r for r in records(rd).values() if r.get("adopted_from")]
    assert len(adopted) >= len([r for r in finished if not r.get("duplicate_of")])
