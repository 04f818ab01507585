"""Plans are compared by their canonical JSON: a run resumed by a version whose full plan JSON
names more knobs (each new knob at its default) still knows the plans it ran."""

from __future__ import annotations

import json
from pathlib import Path

from autocompress.search._searcher import ConstrainedOptunaSearch
from autocompress.search._trial import ADOPT, adopt, plan_key, read_record
from autocompress.spaces import LayerPlan, Plan

OLD = '{"_type":"Plan","_version":1,"layers":{"fc1":{"bits":4,"sparsity":0.0,"scheme":"uniform"}}}'


def test_old_and_new_json_of_one_plan_share_keys() -> None:
    new = Plan(layers={"fc1": LayerPlan(bits=4)}).to_json()
    assert new != OLD and "hot_rows" in new  # the full JSON names every knob
    assert Plan.canonical(new) == Plan.canonical(OLD)
    assert plan_key(new) == plan_key(OLD)
    other = Plan(layers={"fc1": LayerPlan(bits=4, group=32)}).to_json()
    assert plan_key(other) != plan_key(OLD)
    assert Plan.canonical("not json") == "not json"


def test_searcher_pickled_with_raw_keys_finds_its_plans() -> None:
    s = object.__new__(ConstrainedOptunaSearch)  # the state a pickle from an older version restores
    s._seen_plans, s._running, s._plan_of = {OLD: "t1"}, {}, {"t1": OLD}
    new = Plan(layers={"fc1": LayerPlan(bits=4)}).to_json()
    assert s._first_with(new) == "t1"
    assert s._first_with(Plan(layers={"fc1": LayerPlan(bits=8)}).to_json()) is None
    assert s._plan_of == {"t1": Plan.canonical(OLD)}


def _park(run_dir: Path, plan_json: str, slot_of: str) -> Path:
    """An orphaned finished record of ``plan_json`` in the adoption slot of ``slot_of``."""
    pool = run_dir / "records" / ADOPT
    pool.mkdir(parents=True, exist_ok=True)
    rec = {"trial_id": "old1", "plan_json": plan_json, "status": "COMPLETE", "values": {"a": 1.0}}
    slot = pool / f"{plan_key(slot_of)}.json"
    slot.write_text(json.dumps(rec))
    return slot


def test_an_orphan_written_by_an_older_version_is_adopted(tmp_path: Path) -> None:
    """A resumed run finds the orphan of an older version's JSON of the same plan, keeps its
    values and takes it over (it deleted the record and re-ran the plan)."""
    new = Plan(layers={"fc1": LayerPlan(bits=4)}).to_json()
    slot = _park(tmp_path, OLD, OLD)
    rec = adopt(tmp_path, "t_new", new)
    assert rec is not None and rec["values"] == {"a": 1.0}
    assert rec["trial_id"] == "t_new" and rec["adopted_from"] == "old1"
    assert rec["plan_json"] == new  # the searcher sees the JSON it suggested
    assert read_record(tmp_path, "t_new") == rec and not slot.exists()


def test_a_record_of_another_plan_goes_back_to_the_pool(tmp_path: Path) -> None:
    new = Plan(layers={"fc1": LayerPlan(bits=4)}).to_json()
    other = Plan(layers={"fc1": LayerPlan(bits=8)}).to_json()
    slot = _park(tmp_path, other, new)  # a (hash-colliding) record of another plan
    assert adopt(tmp_path, "t_new", new) is None
    assert slot.is_file() and json.loads(slot.read_text())["plan_json"] == other
    assert read_record(tmp_path, "t_new") is None
