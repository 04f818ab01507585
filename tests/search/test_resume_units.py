"""Unit tests of the resume machinery: Tune state checks, adoption, temporaries, progress."""

from __future__ import annotations

import errno
import json
import pickle
import sqlite3
from pathlib import Path

from autocompress.search._driver import disk_problem
from autocompress.search._finalize import _remove_temporaries
from autocompress.search._progress import Progress
from autocompress.search._trial import adopt, plan_key, read_records, write_record
from autocompress.search._tune import put_up_for_adoption, saved_trial_ids, unadopted


def _record(tid: str, plan: str, **kw) -> dict:
    rec = {"trial_id": tid, "plan_json": plan, "status": "COMPLETE", "values": {"accuracy": 0.9}}
    rec.update(params={"fc1.bits": 4}, finished_at=1.0, **kw)
    return rec


def _tune_state(d: Path, ids: list[str]) -> None:
    d.mkdir(parents=True)
    session = "2026-01-01_00-00-00"
    trials = [[json.dumps({"trial_id": i, "config": {}}), "{}"] for i in ids]
    (d / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": trials}))
    for name in ("tuner.pkl", f"searcher-state-{session}.pkl", f"search_gen_state-{session}.json"):
        (d / name).write_bytes(pickle.dumps({"state": list(range(100))}))


def test_saved_trial_ids_checks_every_file_without_unpickling(tmp_path: Path) -> None:
    d = tmp_path / "tune"
    assert saved_trial_ids(d) is None
    _tune_state(d, ["a1", "b2"])
    assert saved_trial_ids(d) == {"a1", "b2"}
    pkl = next(d.glob("searcher-state-*.pkl"))
    data = pkl.read_bytes()
    pkl.write_bytes(data[:-5])  # truncated: no STOP opcode
    assert saved_trial_ids(d) is None
    pkl.write_bytes(data)
    state = next(d.glob("experiment_state-*.json"))
    state.write_text(state.read_text()[:-3])
    assert saved_trial_ids(d) is None


def test_orphans_are_adopted_once_and_duplicates_dropped(tmp_path: Path) -> None:
    write_record(tmp_path, _record("known", "P0"))
    write_record(tmp_path, _record("orphan", "P1"))
    write_record(tmp_path, _record("dup", "P1", duplicate_of="orphan"))
    params = put_up_for_adoption(tmp_path, {"known"})
    assert params == [{"fc1.bits": 4}] and unadopted(tmp_path) == 1
    assert set(read_records(tmp_path)) == {"known"}
    assert adopt(tmp_path, "new1", "P2") is None  # another plan: nothing to adopt
    rec = adopt(tmp_path, "new1", "P1")
    assert rec["trial_id"] == "new1" and rec["adopted_from"] == "orphan"
    assert rec["finished_at"] == 1.0  # the finished work is kept, not redone
    assert adopt(tmp_path, "new2", "P1") is None  # adopted exactly once
    assert set(read_records(tmp_path)) == {"known", "new1"} and unadopted(tmp_path) == 0


def test_a_claim_interrupted_by_a_kill_goes_back_to_the_pool(tmp_path: Path) -> None:
    write_record(tmp_path, _record("orphan", "P1"))
    put_up_for_adoption(tmp_path, set())
    pool = tmp_path / "records" / "adopt"
    (pool / f"{plan_key('P1')}.json").rename(pool / ".claim-new1.json")  # killed mid-adoption
    assert unadopted(tmp_path) == 0
    put_up_for_adoption(tmp_path, set())
    assert unadopted(tmp_path) == 1 and adopt(tmp_path, "new2", "P1")["trial_id"] == "new2"


def test_damaged_records_are_ignored(tmp_path: Path) -> None:
    write_record(tmp_path, _record("ok", "P"))
    rec = tmp_path / "records"
    (rec / "bad.json").write_text("{")
    (rec / "list.json").write_text("[]")
    (rec / "wrongid.json").write_text(json.dumps(_record("other", "P")))
    (rec / "running.json").write_text(json.dumps({**_record("running", "P"), "status": "RUN"}))
    assert set(read_records(tmp_path)) == {"ok"}


def test_temporaries_of_killed_writes_are_removed(tmp_path: Path) -> None:
    (tmp_path / "trials" / "t1").mkdir(parents=True)
    (tmp_path / "trials" / "t1" / ".metrics.json.1.tmp").write_text("x")
    (tmp_path / "trials" / ".t2.1.ab.tmp").mkdir()
    (tmp_path / "records" / "adopt").mkdir(parents=True)
    (tmp_path / "records" / "adopt" / ".claim-x.json").write_text("{}")
    (tmp_path / ".result.json.tmp").write_text("{")
    _remove_temporaries(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [
        "records",
        "records/adopt",
        "records/adopt/.claim-x.json",
        "trials",
        "trials/t1",
    ]


def test_disk_problems_are_recognised_through_wrapping() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("trial controller failed")
    wrapped.__cause__ = full
    assert disk_problem(wrapped) == "No space left on device"
    assert disk_problem(sqlite3.OperationalError("database or disk is full"))
    assert disk_problem(ValueError("something else")) is None


def test_progress_counts_a_resumed_trial_once() -> None:
    p = Progress(3, ["accuracy", "size_bytes"], ["maximize", "minimize"])
    vals = {"accuracy": 0.9, "size_bytes": 10.0}
    p.add("COMPLETE", vals, True, resumed=True, trial_id="a")
    p.add("COMPLETE", vals, True, trial_id="a")  # the restored trial reports its record again
    assert p.done == 1 and p.front_size() == 1


def test_a_run_from_before_a_new_knob_still_resumes(tmp_path: Path) -> None:
    """Settings added since a run.json was written (e.g. Knobs.heads, fine-tune budgets) count
    as unchanged while they keep their defaults; a real change is still refused."""
    import pytest

    from autocompress.errors import ConfigError
    from autocompress.search._checks import check_resume, describe_space
    from autocompress.spaces import CompressionSpace, Knobs
    from autocompress.tasks._models import DigitsMLP

    desc = {
        "task": {"spec": "digits-mlp"},
        "space": describe_space(CompressionSpace.from_model(DigitsMLP())),
        "objective": {"metrics": ["accuracy"]},
        "settings": {"trials": 4},
    }
    old = json.loads(json.dumps(desc, default=str))
    del old["space"]["knobs"]["heads"], old["space"]["finetune"]["max_steps"]
    (tmp_path / "run.json").write_text(json.dumps(old))
    check_resume(tmp_path, desc)  # no error: the new settings are at their defaults
    changed = CompressionSpace.from_model(DigitsMLP(), Knobs(width=(0.5, 1.0), heads=(0.5, 1.0)))
    with pytest.raises(ConfigError, match="the space differs"):
        check_resume(tmp_path, {**desc, "space": describe_space(changed)})


def test_a_run_with_pins_from_before_the_group_knob_still_resumes(tmp_path: Path) -> None:
    """Pinned layers are described with every layer knob: one added since (``group``) counts as
    unchanged at its default; a pin that really differs is still refused."""
    import pytest

    from autocompress.errors import ConfigError
    from autocompress.search._checks import check_resume, describe_space
    from autocompress.spaces import CompressionSpace
    from autocompress.tasks._models import DigitsMLP

    def desc(pin: dict) -> dict:
        space = CompressionSpace.from_model(DigitsMLP(), pin=pin)
        return {
            "task": {"spec": "digits-mlp"},
            "space": describe_space(space),
            "objective": {"metrics": ["accuracy"]},
            "settings": {"trials": 4},
        }

    now = desc({"fc1": {"bits": 8}})
    old = json.loads(json.dumps(now, default=str))
    del old["space"]["pin"]["fc1"]["group"]
    (tmp_path / "run.json").write_text(json.dumps(old))
    check_resume(tmp_path, now)  # no error: group is at its default
    with pytest.raises(ConfigError, match="the space differs"):
        check_resume(tmp_path, desc({"fc1": {"bits": 8, "group": 32}}))


def test_a_failure_on_a_full_disk_is_reported_as_the_disk(tmp_path: Path, monkeypatch) -> None:
    """A library that reads back a file the full disk cut short raises EOFError, not ENOSPC:
    the driver still names the disk (one clear error, not a bare 'Aborted!')."""
    import shutil
    from collections import namedtuple

    from autocompress.search import _driver

    cut = EOFError("Ran out of input")
    assert _driver._why_failed(cut, tmp_path) is None  # a disk with room: not the disk
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(40 << 20, 40 << 20, 0))
    assert _driver._why_failed(cut, tmp_path) == "no space left on device"
    assert "free space" in str(_driver._disk_error("no space left on device", tmp_path))
