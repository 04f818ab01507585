"""The task reaches each worker process once per run; teacher outputs are computed once."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from raykit import private_ray

from autocompress import FinetuneSettings, Task
from autocompress.compress._finetune import soft_targets
from autocompress.objectives import Objective
from autocompress.search import run
from autocompress.search._trial import (
    Shipment,
    TrialSettings,
    WorkerCache,
    evaluate_plan,
    worker_cache,
)
from autocompress.spaces import CompressionSpace, Knobs, Plan

HERE = Path(__file__).resolve().parent
FT = FinetuneSettings(epochs=2)


def _plan(task: Task) -> str:
    names = ["fc1", "fc2", "fc3"]
    return Plan.uniform(names, sparsity=0.5, bits=8, finetune=FT).to_json()


def test_worker_cache_fetches_once_per_run(digits_mlp: Task) -> None:
    import ray

    with private_ray(HERE):
        ref = ray.put(digits_mlp)
        first, s1 = worker_cache(Shipment("run-a", ref))
        again, s2 = worker_cache(Shipment("run-a", ref))
        assert again is first and s1 > 0 and s2 == 0.0
        other, s3 = worker_cache(Shipment("run-b", ref))
        assert other is not first and s3 > 0  # another run: fetched again, the old one dropped
        assert worker_cache(Shipment("run-b", ref))[0] is other


def test_teacher_outputs_computed_once_and_equal_to_the_uncached_ones(
    digits_mlp: Task, tmp_path: Path
) -> None:
    obj = Objective(["accuracy", "size_bytes"])
    settings = TrialSettings(run_dir=str(tmp_path))
    cache = WorkerCache(digits_mlp)
    a = evaluate_plan(_plan(digits_mlp), "a", digits_mlp, obj, settings, cache)
    b = evaluate_plan(_plan(digits_mlp), "b", digits_mlp, obj, settings, cache)
    fresh = evaluate_plan(_plan(digits_mlp), "c", digits_mlp, obj, settings)
    assert a["status"] == b["status"] == fresh["status"] == "COMPLETE"
    assert a["timing"]["teacher_outputs_s"] > 0 and b["timing"]["teacher_outputs_s"] == 0.0
    assert a["values"] == b["values"] == fresh["values"]  # same seed, same soft targets
    soft, took = cache.train_outputs()
    assert took == 0.0 and torch.equal(soft, soft_targets(digits_mlp.teacher(), digits_mlp))
    for rec in (a, b):
        t = rec["timing"]
        assert set(t) == {
            "ship_s", "teacher_outputs_s", "compress_s", "finetune_s", "export_s", "evaluate_s"
        }  # fmt: skip
        assert t["finetune_s"] > 0 and sum(t.values()) <= rec["duration_s"] + t["ship_s"]


def test_no_fine_tune_needs_no_teacher_outputs(digits_mlp: Task, tmp_path: Path) -> None:
    plan = Plan.uniform(["fc1", "fc2", "fc3"], bits=8, finetune=FinetuneSettings(epochs=0))
    cache = WorkerCache(digits_mlp)
    obj = Objective(["accuracy", "size_bytes"])
    rec = evaluate_plan(plan.to_json(), "a", digits_mlp, obj, TrialSettings(str(tmp_path)), cache)
    assert rec["status"] == "COMPLETE" and rec["timing"]["finetune_s"] == 0.0
    assert "teacher_outputs_s" not in rec["timing"] and not cache._soft_done


def test_a_search_ships_the_task_once_per_worker_process(digits_mlp: Task, tmp_path: Path) -> None:
    knobs = Knobs(sparsity=(0.5, 0.9), bits=(4, 8))
    space = CompressionSpace.from_model(digits_mlp.teacher(), knobs, finetune=FT)
    with private_ray(HERE):
        res = run(digits_mlp, space, trials=5, workers=1, run_dir=tmp_path / "r", progress=False)
    recs = [json.loads(p.read_text()) for p in (res.run_dir / "records").glob("*.json")]
    assert len(recs) == 5 and all(r["status"] == "COMPLETE" for r in recs)
    by_pid: dict[int, list[dict]] = {}
    for r in sorted(recs, key=lambda r: r["started_at"]):
        by_pid.setdefault(r["pid"], []).append(r)
    for runs in by_pid.values():  # in each process only the first trial paid for shipping
        assert runs[0]["timing"]["ship_s"] > 0 and runs[0]["timing"]["teacher_outputs_s"] > 0
        assert all(r["timing"]["ship_s"] == 0.0 for r in runs[1:])
        assert all(r["timing"]["teacher_outputs_s"] == 0.0 for r in runs[1:])
    assert len(by_pid) < len(recs)  # reuse_actors: a worker process ran several trials
