"""Memory per trial stays bounded: RSS of a 50-trial search does not grow with the trials."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from rkit import ROOT


@pytest.mark.slow
def test_rss_does_not_grow_with_trials() -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_reliability", ROOT / "benchmarks" / "reliability.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while it executes
    spec.loader.exec_module(bench)
    res = bench.measure(trials=50, workers=2, epochs=5)
    print("\n" + bench.describe(res, 2, 5))
    assert not res["grows"], res["growth"]
    assert res["worker_processes"] >= 2
