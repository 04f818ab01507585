"""The progress line's ETA against a simulated search whose trials get longer as it goes."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from autocompress.search._progress import (
    MIN_TRIALS_FOR_ETA,
    Progress,
    refine_line,
    trial_seconds,
)


def _simulate(n: int, workers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ETA / true time left at each trial end: ours, and the old ``elapsed / done * left``.

    Trial ``i`` lasts ``(1 + 3 i / n)`` seconds +-20% (later plans are smaller and fine-tune
    longer), ``workers`` at a time, in order.
    """
    rng = np.random.default_rng(seed)
    durations = (1 + 3 * np.arange(n) / n) * rng.uniform(0.8, 1.2, n)
    free = [0.0] * workers
    ends = []
    for i, d in enumerate(durations):
        t0 = heapq.heappop(free)
        heapq.heappush(free, t0 + d)
        ends.append((t0 + d, i))
    ends.sort()
    finish = ends[-1][0]
    p = Progress(n, ["accuracy", "size_bytes"], ["maximize", "minimize"], workers=workers)
    ours, old = [], []
    for k, (t, i) in enumerate(ends):
        values = {"accuracy": 0.9, "size_bytes": 1e4, "duration_s": float(durations[i])}
        p.add("COMPLETE", values, True)
        eta, left = p.eta(now=p.start + t), finish - t
        if k + 1 < MIN_TRIALS_FOR_ETA:
            assert eta is None  # no guess from the first, shortest trials
        elif left > 0:
            assert eta is not None
            ours.append(eta / left)
            old.append(t / (k + 1) * (n - k - 1) / left)
    return np.asarray(ours), np.asarray(old)


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eta_is_not_optimistic_early(workers: int, seed: int) -> None:
    ours, old = _simulate(80, workers, seed)
    half = len(ours) // 2
    early = ours[8 - MIN_TRIALS_FOR_ETA : half]  # after the first tenth (the warm start)
    assert early.min() >= 0.65, np.round(early, 2)  # never much too soon
    assert np.median(early) >= 0.9, np.round(early, 2)
    assert 0.9 <= np.median(ours) <= 1.3, np.round(ours, 2)  # and close overall
    assert np.median(old[8 - MIN_TRIALS_FOR_ETA : half]) < 0.7  # the old line: 2x too soon


def test_trial_seconds_follows_a_rising_trend_only() -> None:
    assert trial_seconds([2.0, 2.0, 2.0, 2.0], 10) == 2.0
    falling = trial_seconds([4.0, 3.0, 2.0, 1.0], 10)
    assert falling == 2.5  # the mean: a falling trend is not extrapolated
    assert trial_seconds([1.0, 2.0, 3.0, 4.0], 10) > 4.0


def test_eta_respects_the_time_budget_and_resumed_trials_do_not_count() -> None:
    p = Progress(20, ["accuracy"], ["maximize"], time_budget=30)
    old = {"accuracy": 0.5, "duration_s": 100.0}
    for i in range(6):
        p.add("COMPLETE", old, True, resumed=True, trial_id=str(i))
    assert p.eta(now=p.start) is None  # durations of an earlier session are not this machine's
    for i in range(6, 10):
        p.add("COMPLETE", {"accuracy": 0.5, "duration_s": 10.0}, True, trial_id=str(i))
    assert p.eta(now=p.start + 20) == 10.0  # 100 s of trials left, 10 s of budget
    assert "ETA 10s" in p.line(now=p.start + 20)


def test_refine_line_etas_count_only_this_session_s_fine_tunes() -> None:
    """Two of four plans were refined before a resume: the third took 10 min alone, so one
    more takes about 10 min (not 10 min / 3 finished)."""
    rec = {"trial_id": "a_refined", "refined_from": "a", "status": "COMPLETE", "feasible": False,
           "duration_s": 600.0, "values": {"accuracy": 0.98, "size_bytes": 8.85e6}}  # fmt: skip
    line = refine_line(3, 4, rec, "accuracy", 600.0, workers=2, resumed=2)
    assert line.split(" | ")[1:] == [
        "a: accuracy 0.9800 (8.85 MB), infeasible, in 10m00s",
        "elapsed 10m00s, ETA 10m00s",
    ]
    assert refine_line(2, 4, None, "accuracy", 0.0, 2, resumed=2).endswith("| elapsed 0s")
    failed = {"trial_id": "b_refined", "status": "FAILED", "reason": "killed"}
    assert "b_refined: FAILED (killed)" in refine_line(4, 4, failed, "accuracy", 900.0, 2, 2)
