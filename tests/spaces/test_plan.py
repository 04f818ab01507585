from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autocompress import FinetuneSettings, LayerPlan, Plan, PlanError
from autocompress.spaces import ALLOWED_BITS, SCHEMES

layer_plans = st.builds(
    LayerPlan,
    sparsity=st.floats(0.0, 0.99, allow_nan=False),
    bits=st.sampled_from(ALLOWED_BITS),
    scheme=st.sampled_from(SCHEMES),
    rank_ratio=st.floats(0.01, 1.0, allow_nan=False),
)
plans = st.builds(
    Plan,
    layers=st.dictionaries(st.from_regex(r"[a-z]{1,4}(\.[0-9])?", fullmatch=True), layer_plans),
    width=st.floats(0.05, 1.0, allow_nan=False),
)


@given(plans)
def test_plan_json_round_trip(plan: Plan) -> None:
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(plan.to_json(compact=True)) == plan
    assert len(plan.to_json(compact=True)) <= len(plan.to_json())


def test_compact_json_leaves_out_defaults() -> None:
    plan = Plan.uniform(["fc1"], sparsity=0.5, bits=4, width=0.5)
    assert plan.to_json(compact=True) == (
        '{"_type":"Plan","_version":1,"layers":{"fc1":{"bits":4,"sparsity":0.5}},"width":0.5}'
    )


def test_plan_is_versioned_and_compact() -> None:
    d = json.loads(Plan.uniform(["a"], bits=4).to_json())
    assert d["_type"] == "Plan" and d["_version"] == 1
    assert "\n" not in Plan.uniform(["a"]).to_json()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"bits": 9}, "bits"),
        ({"bits": 1}, "bits"),
        ({"scheme": "fancy"}, "scheme"),
        ({"rank_ratio": 0.0}, "rank_ratio"),
        ({"rank_ratio": 1.5}, "rank_ratio"),
    ],
)
def test_layer_plan_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(PlanError, match=match) as e:
        LayerPlan(**kwargs)
    assert "\n" not in str(e.value)


def test_plan_rejects_bad_json() -> None:
    with pytest.raises(PlanError, match="_version"):
        Plan.from_dict({"_type": "Plan", "_version": 99})
    with pytest.raises(PlanError, match="unknown keys"):
        Plan.from_dict({"layers": {}, "oops": 1})
    with pytest.raises(PlanError, match="unknown knobs"):
        Plan.from_dict({"layers": {"fc": {"bitz": 4}}})
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlanError, match="width"):
        Plan(width=0.0)
    with pytest.raises(PlanError, match="epochs"):
        FinetuneSettings(epochs=-1)


def test_uniform_and_identity() -> None:
    p = Plan.uniform(["b", "a"], sparsity=0.5, bits=4)
    assert list(p.layers) == ["a", "b"]
    assert not p.is_identity
    assert Plan.uniform(["a"]).is_identity
