"""The driver SIGKILLed while refined trials run (``search.refine``), then resumed.

A screen-then-refine run has two phases: Tune's calibration-only screening trials, then the K
most promising plans re-run with the full fine-tune as ``<id>_refined`` Ray tasks outside Tune.
The kill lands in the second phase (one refined record on disk, the others in flight or
queued); the resumed run must keep every finished trial, run each missing refined trial once,
and end with exactly K refined trials and a front consistent with the trials table.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from rkit import artifact_hashes, check_run, cli, records, write_experiment

from autocompress.spaces import FinetuneSettings, Plan

TRIALS, REFINE, EPOCHS = 6, 3, 6


def _refined(rd: Path) -> list[Path]:
    return list((rd / "records").glob("*_refined.json"))


@pytest.mark.slow
def test_sigkill_during_refine_then_resume(drivers, tmp_path: Path, tally) -> None:
    exp = write_experiment(
        tmp_path / "exp.yaml", trials=TRIALS, epochs=EPOCHS, keep_artifacts="all", refine=REFINE
    )
    rd = tmp_path / "run"
    args = [*cli(), "run", str(exp), "--run-dir", str(rd)]
    drv = drivers(args, tmp_path / "s1.log")
    # REFINE > workers: when the first refined record appears, another is still to finish
    drv.poll_until(lambda: _refined(rd), 900, "the first refined trial", dt=0.02)
    drv.signal(signal.SIGKILL)
    drv.close()
    tally["faults injected"] += 1
    before, arts = records(rd), artifact_hashes(rd)
    done_refined = [t for t, r in before.items() if r.get("refined_from")]
    assert 1 <= len(done_refined) < REFINE, "refine ended before the kill: nothing was tested"
    assert sum(not r.get("refined_from") for r in before.values()) == TRIALS

    drv = drivers([*args, "--resume"], tmp_path / "s2.log")
    rc = drv.wait(timeout=900)
    tally["runs resumed"] += 1
    assert rc == 0, drv.output()[-3000:]

    # 0 trials lost, none run again, every record a row, front = front of the table
    got = check_run(rd, TRIALS + REFINE, before, arts)
    assert got["kept"] == sum(r["status"] in ("COMPLETE", "FAILED") for r in before.values())
    assert json.loads((rd / "result.json").read_text())["interrupted"] is False
    recs = records(rd)
    refined = {t: r for t, r in recs.items() if r.get("refined_from")}
    screened = {t: r for t, r in recs.items() if not r.get("refined_from")}
    assert len(refined) == REFINE and len(screened) == TRIALS
    origins = [r["refined_from"] for r in refined.values()]
    assert len(set(origins)) == REFINE and set(origins) <= set(screened)
    assert set(refined) == {f"{o}_refined" for o in origins}  # each refined exactly once
    full = FinetuneSettings(epochs=EPOCHS, patience=EPOCHS)
    for tid, rec in refined.items():
        plan = Plan.from_json(rec["plan_json"])
        assert plan.finetune == full, tid
        assert plan == Plan.from_json(screened[rec["refined_from"]]["plan_json"]).replace(
            finetune=full
        )
    for tid in done_refined:  # finished before the kill: kept as it was, not run again
        assert recs[tid]["finished_at"] == before[tid]["finished_at"]
