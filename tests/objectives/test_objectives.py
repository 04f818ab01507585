from __future__ import annotations

import math
import sys
import tempfile
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autocompress import ConfigError, Task
from autocompress.artifacts import export
from autocompress.objectives import (
    Constraint,
    Metric,
    Objective,
    Reference,
    get_metric,
    metric_names,
    register_metric,
    teacher_size_bytes,
)
from autocompress.spaces import Plan


# --- constraints ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "metric", "op", "bound"),
    [
        ("accuracy_drop <= 0.01", "accuracy_drop", "<=", 0.01),
        ("size_bytes<=50000", "size_bytes", "<=", 50000.0),
        ("  accuracy >= 0.95 ", "accuracy", ">=", 0.95),
        ("size_bytes <= 5e4", "size_bytes", "<=", 50000.0),
    ],
)
def test_constraint_parse(text: str, metric: str, op: str, bound: float) -> None:
    c = Constraint.parse(text)
    assert (c.metric, c.op, c.bound) == (metric, op, bound)
    assert Constraint.parse(str(c)) == c


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("accuracy_drop << 0.01", "not 'metric <= number'"),
        ("accuracy_drop < 0.01", "use <= or >="),
        ("accuracy == 0.9", "use <= or >="),
        ("accuracy <= abc", "not a number"),
        ("accuracy <= nan", "finite"),
        ("<= 3", "not 'metric <= number'"),
    ],
)
def test_constraint_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Constraint.parse(text)


def test_constraint_unknown_metric_names_allowed() -> None:
    with pytest.raises(ConfigError, match=r"unknown metric 'acuracy'.*accuracy_drop"):
        Objective(["accuracy"], ["acuracy >= 0.9"])
    with pytest.raises(ConfigError, match="unknown metric"):
        Constraint.parse("foo <= 1", allowed=["accuracy"])


@given(
    bound=st.floats(-1e6, 1e6, allow_nan=False),
    value=st.floats(-1e6, 1e6, allow_nan=False),
    op=st.sampled_from(["<=", ">="]),
)
def test_constraint_value_sign_matches_truth(bound: float, value: float, op: str) -> None:
    c = Constraint("m", op, bound)
    holds = value <= bound if op == "<=" else value >= bound
    assert (c.value({"m": value}) <= 0) == holds
    assert c.satisfied({"m": value}) == holds


def test_constraint_missing_or_nan_is_infeasible() -> None:
    c = Constraint.parse("accuracy >= 0.9")
    assert c.value({}) == math.inf
    assert c.value({"accuracy": math.nan}) == math.inf


# --- metrics -------------------------------------------------------------------------------
def test_builtin_metrics_registered() -> None:
    assert {"accuracy", "size_bytes", "compression_ratio", "params"} <= set(metric_names())
    assert get_metric("compression_ratio").direction == "maximize"
    assert get_metric("params").direction == "minimize"


def test_metric_validation() -> None:
    with pytest.raises(ConfigError, match="direction"):
        Metric("x", "up", lambda m, a, t: 0.0)
    with pytest.raises(ConfigError, match="letters"):
        Metric("bad name", "max", lambda m, a, t: 0.0)
    with pytest.raises(ConfigError, match="unknown metric"):
        get_metric("latency")
    assert Metric("x", "MAX", lambda m, a, t: 0.0).direction == "maximize"


def test_register_metric_decorator_and_duplicates() -> None:
    @register_metric("test_one", "minimize", overwrite=True)
    def one(model, artifact, task) -> float:
        return 1.0

    assert get_metric("test_one").fn is one
    with pytest.raises(ConfigError, match="already registered"):
        register_metric(Metric("test_one", "minimize", one))
    obj = Objective(["accuracy", "test_one"], ["test_one <= 2"])
    assert obj.directions == ["maximize", "minimize"]


def test_metric_from_module_function() -> None:
    mod = types.ModuleType("ac_test_metrics")

    def flops(model, artifact, task) -> float:
        return 7.0

    def factory() -> Metric:
        return Metric("made", "maximize", lambda m, a, t: 2.0)

    def tagged(model, artifact, task) -> float:
        return 3.0

    tagged.direction = "minimize"  # type: ignore[attr-defined]
    mod.flops, mod.factory, mod.tagged = flops, factory, tagged
    mod.ready = Metric("ready", "min", flops)
    sys.modules["ac_test_metrics"] = mod
    try:
        assert get_metric("ac_test_metrics:flops:minimize").name == "flops"
        assert get_metric("ac_test_metrics:factory").name == "made"
        assert get_metric("ac_test_metrics:tagged").direction == "minimize"
        assert get_metric("ac_test_metrics:ready").name == "ready"
        with pytest.raises(ConfigError, match="direction"):
            get_metric("ac_test_metrics:flops")
        with pytest.raises(ConfigError, match="no callable"):
            get_metric("ac_test_metrics:nothing")
        with pytest.raises(ConfigError, match="cannot import"):
            get_metric("no_such_module_xyz:f:max")
    finally:
        del sys.modules["ac_test_metrics"]


# --- objective -----------------------------------------------------------------------------
def test_objective_validation() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        Objective([])
    with pytest.raises(ConfigError, match="twice"):
        Objective(["accuracy", "accuracy"])
    with pytest.raises(ConfigError, match="not in the objective"):
        Objective(["accuracy"], weights={"size_bytes": 1.0})
    with pytest.raises(ConfigError, match="finite"):
        Objective(["accuracy"], weights={"accuracy": math.inf})
    with pytest.raises(ConfigError, match="reserved"):
        Objective([Metric("score", "max", lambda m, a, t: 0.0)])


def test_default_objective() -> None:
    obj = Objective.default()
    assert obj.names == ["accuracy", "size_bytes"]
    assert obj.directions == ["maximize", "minimize"]
    assert [str(c) for c in obj.constraints] == ["accuracy_drop <= 0.01"]
    assert obj.search_metrics == (["accuracy", "size_bytes"], ["max", "min"])
    assert obj.describe()["weights"] is None


def test_scalarize() -> None:
    obj = Objective(["accuracy", "size_bytes"], weights={"accuracy": 2.0, "size_bytes": 1e-5})
    assert obj.scalarize({"accuracy": 0.5, "size_bytes": 1e4}) == pytest.approx(0.9)
    assert obj.search_metrics == (["score"], ["max"])
    with pytest.raises(ConfigError, match="weights"):
        Objective(["accuracy"]).scalarize({"accuracy": 1.0})


def test_evaluate_on_real_artifact(digits_mlp: Task) -> None:
    teacher = digits_mlp.teacher()
    obj = Objective(["accuracy", "size_bytes", "params"], ["compression_ratio >= 2"])
    with tempfile.TemporaryDirectory() as tmp:
        t_art = export(teacher, Plan(), f"{tmp}/teacher", task_spec=digits_mlp.spec)
        ref = Reference(t_art.size_bytes, {"val": 0.99})
        plan = Plan.uniform(["fc1", "fc2", "fc3"], sparsity=0.9, bits=4)
        from autocompress.compress import apply

        small = apply(teacher, plan, None)
        art = export(small, plan, f"{tmp}/small", task_spec=digits_mlp.spec)
        vals = obj.evaluate(small, art, digits_mlp, "val", ref)
        assert vals["size_bytes"] == art.size_bytes
        assert vals["compression_ratio"] == pytest.approx(t_art.size_bytes / art.size_bytes)
        assert vals["accuracy"] == digits_mlp.evaluate(small, "val")["accuracy"]
        assert vals["accuracy_drop"] == pytest.approx(0.99 - vals["accuracy"])
        n = sum(int(p.count_nonzero()) for p in small.parameters())
        assert vals["params"] == n < sum(p.numel() for p in teacher.parameters()) * 0.2
        assert obj.feasible(vals) and obj.violation(vals) == 0.0
        test_vals = obj.evaluate(small, art, digits_mlp, "test", ref)
        assert "accuracy_drop" not in test_vals  # no teacher test score in the reference
        assert test_vals["accuracy"] == digits_mlp.evaluate(small, "test")["accuracy"]
        # without a reference, compression_ratio exports the teacher itself to measure it
        assert teacher_size_bytes(digits_mlp) == t_art.size_bytes
        ratio = get_metric("compression_ratio")(small, art, digits_mlp)
        assert ratio == pytest.approx(t_art.size_bytes / art.size_bytes)
