"""A small run directory written from synthetic trial records (no Ray, no training): the
tables go through the product's own ``trial_rows`` / ``front_mask`` / ``write_csv``, so the
report reads exactly what a search writes. Importable as ``reportkit`` (pytest puts this folder
on ``sys.path``), like ``raykit``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autocompress.search._tables import front_mask, trial_rows, write_csv

TEACHER = {
    "artifact": "teacher",
    "size_bytes": 188120,
    "val": {"accuracy": 0.9778, "accuracy_drop": 0.0, "compression_ratio": 1.0},
    "test": {"accuracy": 0.9722, "accuracy_drop": 0.0, "compression_ratio": 1.0},
}
OBJECTIVE = {
    "metrics": [
        {"name": "accuracy", "direction": "maximize"},
        {"name": "size_bytes", "direction": "minimize"},
    ],
    "constraints": ["accuracy_drop <= 0.01"],
    "weights": None,
}


def _plan(bits: int, sparsity: float, width: float, scheme: str = "uniform") -> str:
    layer = {"bits": bits, "rank_ratio": 1.0, "scheme": scheme, "sparsity": sparsity}
    layers = {n: dict(layer) for n in ("fc1", "fc2", "fc3")}
    layers["fc3"]["bits"] = 8
    return json.dumps({"_type": "Plan", "_version": 1, "layers": layers, "width": width})


def make_run(run: Path, n: int = 12, latency: bool = False, seed: int = 0) -> Path:
    """``n`` complete trials, one FAILED with a reason, one crashed without a record, one
    stopped, one duplicate; the front on val with test metrics."""
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True)
    records, tune = {}, {}
    for i in range(n):
        tid = f"t{i:03d}"
        bits, sp, w = int(rng.choice([2, 4, 6, 8])), float(rng.uniform(0.5, 0.95)), 1.0
        size = 188120 * (1 - sp) * bits / 32 + 1500
        acc = 0.978 - 0.04 * (8 - bits) / 6 * sp - rng.uniform(0, 0.005)
        values = {
            "accuracy": acc,
            "size_bytes": round(size),
            "accuracy_drop": 0.9778 - acc,
            "compression_ratio": 188120 / round(size),
        }
        if latency:
            values["latency_ms"] = 0.2 + size / 1e5
            values["teacher_latency_ms"] = 2.1
        records[tid] = {
            "trial_id": tid,
            "status": "COMPLETE",
            "plan_json": _plan(bits, round(sp, 2), w, "codebook" if i % 3 == 0 else "uniform"),
            "values": values,
            "feasible": values["accuracy_drop"] <= 0.01,
            "violation": max(0.0, values["accuracy_drop"] - 0.01) / 0.01,
            "duration_s": 1.0 + i / 10,
            "finished_at": 1000.0 + i,
        }
        tune[tid] = {"error": None, "plan_json": records[tid]["plan_json"]}
    dup = dict(records["t000"], trial_id="tdup", duplicate_of="t000", finished_at=2000.0)
    records["tdup"], tune["tdup"] = dup, {"error": None}
    records["tfail"] = {
        "trial_id": "tfail",
        "status": "FAILED",
        "reason": "Traceback ...\nRuntimeError: loss is nan at epoch 3",
        "plan_json": _plan(2, 0.97, 0.1),
        "finished_at": 1500.0,
    }
    tune["tfail"] = {"error": "x"}
    tune["tcrash"] = {"error": "RayActorError: the worker died", "plan_json": _plan(3, 0.9, 0.5)}
    tune["tstop"] = {"error": None, "plan_json": _plan(4, 0.8, 0.7)}  # no record: STOPPED
    trials = trial_rows(tune, records, ["accuracy", "size_bytes"])
    trials = write_csv(trials, run / "trials.csv")
    mask = front_mask(trials, ["accuracy", "size_bytes"], ["maximize", "minimize"])
    pareto = trials[mask].copy()
    for c in ("size_bytes", "compression_ratio"):
        pareto[f"test_{c}"] = pareto[c]
    pareto["test_accuracy"] = pareto["accuracy"] - 0.003
    pareto["test_accuracy_drop"] = 0.9722 - pareto["test_accuracy"]
    write_csv(pareto, run / "pareto.csv")
    result = {
        "_type": "autocompress-result",
        "_version": 1,
        "teacher": TEACHER,
        "objective": OBJECTIVE,
        "message": None,
        "settings": {"sampler": "tpe", "seed": 0, "trials": n + 3, "workers": 2},
        "wall_time_s": 61.5,
    }
    (run / "result.json").write_text(json.dumps(result))
    meta = {
        "task": {"name": "digits-mlp", "metric_name": "accuracy"},
        "space": {"layers": ["fc1", "fc2", "fc3"]},
    }
    (run / "run.json").write_text(json.dumps(meta))
    return run
