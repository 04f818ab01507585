"""Smoke tests of the search benchmarks' helpers (not the benchmarks themselves)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _search_common as sc  # noqa: E402

REF = (0.8, 5.0)


def test_hypervolume_single_point_is_a_rectangle():
    # 0.1 accuracy above the reference x 2 decades below it
    assert sc.hypervolume([0.9], [1e3], REF) == pytest.approx(0.2)


def test_hypervolume_ignores_points_outside_the_reference():
    assert sc.hypervolume([0.7, 0.9], [10.0, 1e6], REF) == 0.0
    assert sc.hypervolume([], [], REF) == 0.0
    assert sc.hypervolume([math.nan], [10.0], REF) == 0.0


def test_hypervolume_dominated_point_adds_nothing_and_more_points_never_lower():
    base = sc.hypervolume([0.9, 0.95], [100.0, 1e4], REF)
    assert sc.hypervolume([0.9, 0.95, 0.85], [100.0, 1e4, 1e3], REF) == pytest.approx(base)
    assert sc.hypervolume([0.9, 0.95, 0.97], [100.0, 1e4, 1e3], REF) > base


def test_hypervolume_staircase_exact():
    # points (log size 2, acc 0.9) and (log size 4, acc 0.95): 2*0.1 + 1*0.15
    assert sc.hypervolume([0.9, 0.95], [1e2, 1e4], REF) == pytest.approx(0.35)


def test_reference_point_and_front_hv():
    ref = sc.hv_reference(0.97, 1e5)
    assert ref == pytest.approx((0.776, 5.0))
    front = pd.DataFrame({"test_accuracy": [0.96], "size_bytes": [1e3]})
    assert sc.front_hv(front, 0.97, 1e5) == pytest.approx((0.96 - 0.776) * 2)
    assert sc.front_hv(front.iloc[:0], 0.97, 1e5) == 0.0


def test_val_front_keeps_feasible_non_dominated():
    df = pd.DataFrame(
        {
            "accuracy": [0.9, 0.8, 0.95, 0.99],
            "size_bytes": [10.0, 20.0, 30.0, 5.0],
            "feasible": [True, True, True, False],
        }
    )
    assert sc.val_front(df).index.tolist() == [0, 2]


@pytest.fixture(scope="module")
def space():
    from autocompress.tasks._models import DigitsMLP

    return sc.quality_space("digits-mlp", DigitsMLP())


def test_uniform_grid_is_uniform_and_on_the_space(space):
    from autocompress.search._searcher import baseline_params

    plans = sc.uniform_grid(space, 100)
    assert len(plans) == 100 == len({p.to_json() for p in plans})
    for p in plans:
        assert len({lp for lp in p.layers.values()}) == 1
    assert len(baseline_params(space, plans, strict=True)) == 100
    small = sc.uniform_grid(space, 12)
    assert len(small) == 12 and small[0].to_json() == plans[0].to_json()


def test_sequential_builders(space):
    import optuna

    s1 = sc.stage1_space(space)
    assert s1.knobs.bits == (32,) and space.knobs.bits != (32,)
    trials = pd.DataFrame(
        {
            "status": ["COMPLETE"] * 3,
            "feasible": [True, True, False],
            "size_bytes": [100.0, 50.0, 10.0],
            "accuracy": [0.9, 0.9, 0.5],
            "fc1.sparsity": [0.5, 0.6, 0.9],
            "fc2.sparsity": [0.5, 0.7, 0.9],
            "fc3.sparsity": [0.5, 0.8, 0.9],
            "width": [1.0, 0.4, 0.1],
        }
    )
    fixed = sc.fixed_structure(trials, space)
    assert fixed == {"fc1.sparsity": 0.6, "fc2.sparsity": 0.7, "fc3.sparsity": 0.8, "width": 0.4}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = sc.partial_fixed_sampler(fixed, 0, 10)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(3):
        trial = study.ask()
        plan = space.suggest(trial)
        assert plan.width == 0.4 and plan.layers["fc2"].sparsity == 0.7
        study.tell(trial, [0.9, 1.0])


def test_mean_spread():
    assert sc.mean_spread([1.0, 3.0]) == "2.0000 ± 1.4142"
    assert sc.mean_spread([2.0]) == "2.0000 ± 0.0000"


# ----------------------------------------------------------------------------- headlines on val


def _front():
    # teacher: val 0.98, test 0.97; the smallest member holds on val (drop 0.9 pt) but not on
    # test (drop 2 pt), the next is 1.5 pt below on val but perfect on test
    return pd.DataFrame(
        {
            "trial_id": ["small", "peek", "mid", "big"],
            "accuracy": [0.971, 0.965, 0.975, 0.98],
            "size_bytes": [100.0, 150.0, 200.0, 400.0],
            "test_accuracy": [0.95, 0.97, 0.965, 0.97],
            "speedup": [6.0, 9.0, 4.0, 2.0],
            "feasible": [True, True, True, True],
        }
    )


def test_val_chosen_ignores_test_and_picks_the_smallest_within_one_val_point():
    pick = sc.val_chosen(_front(), 0.98)
    assert pick["trial_id"] == "small"  # 2 points below on test: still the val choice
    largest = sc.val_chosen(_front(), 0.98, by="speedup", largest=True)
    assert largest["trial_id"] == "small"  # "peek" is faster but 1.5 points below on val
    changed = _front().assign(test_accuracy=[0.0, 1.0, 1.0, 1.0])
    assert sc.val_chosen(changed, 0.98)["trial_id"] == "small"


def test_val_chosen_respects_feasible_and_returns_none():
    f = _front().assign(feasible=[False, True, True, True])
    assert sc.val_chosen(f, 0.98)["trial_id"] == "mid"
    assert sc.val_chosen(_front(), 0.999) is None
    assert sc.val_chosen(_front().iloc[:0], 0.98) is None


def test_latency_headline_is_chosen_on_val():
    latency = pytest.importorskip("latency")
    assert latency.val_fastest(_front(), 0.98)["trial_id"] == "small"
    assert latency.val_fastest(_front(), 0.999) is None


def test_targets_are_judged_on_the_test_drop_of_the_val_chosen_member():
    import search_quality as sq

    assert sq._judge(90.0, 0.005, 80.0) == "met"
    assert sq._judge(90.0, 0.011, 80.0) == "missed (test drop 1.10 pt > 1)"
    assert sq._judge(70.0, 0.0, 80.0) == "missed (70.0x < 80x)"
    assert sq._judge(0.0, None, 80.0).startswith("missed (no val-feasible")
