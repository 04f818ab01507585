from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from autocompress.search._pareto import hv2d, hypervolume_history, non_dominated
from autocompress.search._progress import Progress


def _dominates(a: np.ndarray, b: np.ndarray, signs: np.ndarray) -> bool:
    """Brute force: a at least as good everywhere and strictly better somewhere."""
    la, lb = a * signs, b * signs  # losses
    return bool(all(x <= y for x, y in zip(la, lb, strict=True)) and any(la < lb))


cases = st.integers(2, 3).flatmap(
    lambda m: st.tuples(
        arrays(
            np.float64,
            st.tuples(st.integers(0, 25), st.just(m)),
            elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 10.0, np.nan]),
        ),
        st.lists(st.sampled_from(["maximize", "minimize"]), min_size=m, max_size=m),
        st.lists(st.booleans(), min_size=25, max_size=25),
    )
)


@settings(max_examples=300, deadline=None)
@given(cases)
def test_front_matches_brute_force(case) -> None:
    values, directions, feasible_list = case
    n = len(values)
    feasible = np.array(feasible_list[:n], dtype=bool)
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    idx = np.flatnonzero(feasible)
    mask = np.zeros(n, dtype=bool)
    mask[idx] = non_dominated(values[idx], directions)
    finite = np.isfinite(values).all(axis=1)
    for i in range(n):
        eligible = feasible[i] and finite[i]
        dominated = any(
            _dominates(values[j], values[i], signs)
            for j in range(n)
            if feasible[j] and finite[j] and j != i
        )
        # the front holds exactly the feasible, finite, non-dominated rows
        assert mask[i] == (eligible and not dominated), (i, values, directions)
    front = values[mask]
    for a in front:  # and it is mutually non-dominated
        assert not any(_dominates(b, a, signs) for b in front)


def test_non_dominated_examples_and_errors() -> None:
    v = np.array([[0.9, 100.0], [0.9, 100.0], [0.8, 100.0], [0.95, 300.0]])
    assert non_dominated(v, ["maximize", "minimize"]).tolist() == [True, True, False, True]
    assert non_dominated(np.zeros((0, 2)), ["max", "min"]).tolist() == []
    with pytest.raises(ValueError, match="directions"):
        non_dominated(v, ["maximize"])
    with pytest.raises(ValueError, match="unknown"):
        non_dominated(v, ["up", "down"])


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 12), st.just(2)), elements=st.floats(0, 1)))
def test_hv2d_matches_optuna(points: np.ndarray) -> None:
    from optuna._hypervolume import compute_hypervolume

    ref = np.array([1.1, 1.1])
    assert hv2d(points, ref) == pytest.approx(compute_hypervolume(points, ref), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 15), st.just(2)),
        elements=st.floats(1, 1e6) | st.just(np.nan),
    )
)
def test_hypervolume_history_never_decreases(values: np.ndarray) -> None:
    hv = hypervolume_history(values, ["maximize", "minimize"], ["accuracy", "size_bytes"])
    assert len(hv) == len(values)
    assert (np.diff(hv) >= -1e-12).all()
    assert (hv >= 0).all() and (hv <= 1.1**2 + 1e-9).all()


def test_progress_line() -> None:
    p = Progress(4, ["accuracy", "size_bytes"], ["maximize", "minimize"], time_budget=10)
    assert p.line(now=p.start).startswith("search: 0/4 trials, 0 failed | front 0 | no feasible")
    p.add("COMPLETE", {"accuracy": 0.9, "size_bytes": 10.0, "compression_ratio": 5.0}, True)
    p.add("COMPLETE", {"accuracy": 0.99, "size_bytes": 20.0, "compression_ratio": 9.0}, False)
    p.add("FAILED", {}, False)
    line = p.line(now=p.start + 30)
    assert "3/4 trials, 1 failed" in line and "front 1" in line
    assert "best feasible accuracy 0.9000 (10 B, 5.0x)" in line  # the infeasible 0.99 is not
    assert "ETA" not in line  # no trial durations yet: no guess
    p.add("COMPLETE", {"accuracy": 0.95, "size_bytes": 30.0, "compression_ratio": 3.0}, True)
    line = p.line()
    assert "front 2" in line and "done in" in line
    assert "best feasible accuracy 0.9500 (30 B, 3.0x)" in line
    assert "smallest feasible 10 B, 5.0x, accuracy 0.9000" in line
