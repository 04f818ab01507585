"""Plans are compared by their canonical JSON: a run resumed by a version whose full plan JSON
names more knobs (each new knob at its default) still knows the plans it ran."""

from __future__ import annotations

from autocompress.search._searcher import ConstrainedOptunaSearch
from autocompress.search._trial import plan_key
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
