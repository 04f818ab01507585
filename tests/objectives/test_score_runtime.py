"""score_runtime="onnxruntime": the task metric of the ONNX form a trial ships, constraints judged
on it, and a faster form that breaks a constraint never reported silently."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import autocompress.objectives._deploy as deploy_metrics
import autocompress.objectives._runtime as runtime_mod
from autocompress import ConfigError, Task
from autocompress.artifacts import export, load, write_metrics
from autocompress.compress import apply
from autocompress.config import build_objective, parse_experiment
from autocompress.deploy import export_fp32
from autocompress.objectives import Objective, Reference
from autocompress.spaces import Plan

HERE = Path(__file__).resolve().parent


def tiny_task() -> Task:
    torch.manual_seed(0)
    x = torch.randn(200, 32)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return Task.from_module(teacher, (x, y), (x[:100], y[:100]), (x[100:], y[100:]))


def _q(task: Task) -> tuple[nn.Module, Plan]:
    plan = Plan.uniform(["0", "2"], bits=4)
    return apply(task.teacher(), plan), plan


def _ref(task: Task) -> Reference:
    return Reference(scores={s: task.evaluate(task.teacher(), s)["accuracy"] for s in ("val",)})


def test_bad_score_runtime_is_refused() -> None:
    with pytest.raises(ConfigError, match="score_runtime='tensorrt' is unknown"):
        Objective(["accuracy"], score_runtime="tensorrt")
    assert "score_runtime" not in Objective(["accuracy"]).describe()  # old run.json resume
    assert Objective(["accuracy"], score_runtime="onnxruntime").describe()["score_runtime"] == (
        "onnxruntime"
    )


def test_yaml_score_runtime() -> None:
    exp = parse_experiment(
        {
            "task": "digits-mlp",
            "objective": {"metrics": ["accuracy", "onnx_bytes"], "score_runtime": "onnxruntime"},
        }
    )
    assert build_objective(exp).score_runtime == "onnxruntime"
    assert build_objective(parse_experiment({"task": "digits-mlp"})).score_runtime == "torch"
    with pytest.raises(ConfigError, match="score_runtime"):
        parse_experiment({"task": "digits-mlp", "objective": {"score_runtime": "tvm"}})


def test_scored_in_onnxruntime_on_the_lowbit_form(tmp_path: Path) -> None:
    task = tiny_task()
    q, plan = _q(task)
    art = export(q, plan, tmp_path / "a")
    obj = Objective(
        ["accuracy", "onnx_bytes"], ["accuracy_drop <= 0.5"], score_runtime="onnxruntime"
    )
    values = obj.evaluate(q, art, task, "val", _ref(task))
    chosen = [k for k, v in values.items() if k.startswith("onnx_form_") and v == 1.0]
    assert len(chosen) == 1 and values["onnx_form_fallback"] == 0.0
    form = chosen[0][len("onnx_form_") :]
    assert values["accuracy"] == values[f"onnx_score_{form}"]
    if form == "lowbit":  # the same weights as torch: the same predictions
        assert values["accuracy"] == task.evaluate(q, "val")["accuracy"]
    entry = deploy_metrics._entry(q)
    assert entry.pinned == form and values["onnx_bytes"] == len(entry.forms[form])


def test_a_faster_form_that_breaks_the_constraint_is_not_reported(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """The preferred (faster) form scores below the bound: the trial reports the form that
    meets it, and says so."""
    task = tiny_task()
    q, plan = _q(task)
    art = export(q, plan, tmp_path / "a")
    real_forms = deploy_metrics._forms
    torch.manual_seed(1)
    garbage = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    broken = export_fp32(garbage, torch.randn(2, 32)).SerializeToString()

    def forms(entry, model, task, who, approx=False):
        got = real_forms(entry, model, task, who, approx)
        got["int8"] = broken  # a form that runs but scores badly
        return got

    monkeypatch.setattr(deploy_metrics, "_forms", forms)
    monkeypatch.setattr(runtime_mod, "_candidates", lambda *a, **k: ["int8", "lowbit"])
    obj = Objective(
        ["accuracy", "size_bytes"], ["accuracy_drop <= 0.1"], score_runtime="onnxruntime"
    )
    with caplog.at_level(logging.INFO, logger="autocompress.objectives"):
        values = obj.evaluate(q, art, task, "val", _ref(task))
    assert values["onnx_form_fallback"] == 1.0 and values["onnx_form_lowbit"] == 1.0
    assert values["onnx_score_int8"] < values["onnx_score_lowbit"] == values["accuracy"]
    assert obj.feasible(values)
    assert "the int8 ONNX form scores" in caplog.text and "the lowbit form" in caplog.text
    # the test split reuses the form chosen on val (from metrics.json), int8 is not scored
    write_metrics(art.path, values)
    reloaded = load(art.path, model=nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
    test = obj.evaluate(reloaded, art, task, "test", _ref(task))
    assert test["onnx_form_lowbit"] == 1.0 and "onnx_score_int8" not in test


def test_no_form_meets_it_reports_the_best_and_is_infeasible(tmp_path: Path) -> None:
    task = tiny_task()
    q, plan = _q(task)
    art = export(q, plan, tmp_path / "a")
    obj = Objective(["accuracy"], ["accuracy >= 1.01"], score_runtime="onnxruntime")
    values = obj.evaluate(q, art, task, "val", _ref(task))
    scores = {k: v for k, v in values.items() if k.startswith("onnx_score_")}
    assert len(scores) >= 2  # every form was tried
    assert values["accuracy"] == max(scores.values()) and not obj.feasible(values)


def test_forms_over_the_size_cap_are_never_scored(tmp_path: Path, monkeypatch) -> None:
    """An int8-activation form larger than 1.25x the artifact is not scored, not even as a
    fallback when the exact form breaks the constraint (the trial would report the accuracy,
    bytes and latency of a file it promised never to ship)."""
    import autocompress.deploy._onnx as onnx_mod

    task = tiny_task()
    q, plan = _q(task)
    art = export(q, plan, tmp_path / "a")
    entry = deploy_metrics._entry(q)
    sizes = {f: len(b) for f, b in deploy_metrics._forms(entry, q, task, "accuracy", True).items()}
    assert sizes["lowbit"] < min(sizes["lowbit_int8"], sizes["int8"], sizes["int8_token"])
    cap = sizes["lowbit"]
    assert runtime_mod._candidates(entry, q, task, 32, 1, cap) == ["lowbit", "fp32"]
    assert len(runtime_mod._candidates(entry, q, task, 32, 1, None)) == len(sizes)
    monkeypatch.setattr(onnx_mod, "SIZE_SLACK", (cap + 0.5) / art.size_bytes)  # cap: lowbit
    obj = Objective(["accuracy"], ["accuracy >= 1.01"], score_runtime="onnxruntime")
    values = obj.evaluate(q, art, task, "val", _ref(task))
    scored = {k[len("onnx_score_") :] for k in values if k.startswith("onnx_score_")}
    assert scored == {"lowbit", "fp32"} and not obj.feasible(values)


@pytest.mark.slow
def test_search_scores_in_onnxruntime(tmp_path: Path) -> None:
    """A 3-trial search with score_runtime: every record names the form it scored."""
    from raykit import private_ray

    from autocompress.search import run
    from autocompress.spaces import CompressionSpace, Knobs
    from autocompress.tasks import get_task

    task = get_task("digits-mlp")
    space = CompressionSpace.from_model(task.teacher(), Knobs(bits=(4, 8), sparsity=(0.0, 0.5)))
    obj = Objective(
        ["accuracy", "onnx_bytes"], ["accuracy_drop <= 0.05"], score_runtime="onnxruntime"
    )
    with private_ray(HERE):
        result = run(
            task,
            space,
            obj,
            trials=3,
            workers=1,
            run_dir=tmp_path / "r",
            progress=False,
            baselines=[],
        )
    done = result.trials[result.trials["status"] == "COMPLETE"]
    assert len(done) == 3
    forms = done[
        [c for c in done.columns if c.startswith("onnx_form_") and c != "onnx_form_fallback"]
    ].fillna(0)
    assert (forms.sum(axis=1) == 1).all()


def test_preferred_form_is_timed_where_the_objective_measures_latency() -> None:
    from autocompress.objectives._runtime import choice_setting

    assert choice_setting(Objective(["accuracy", "size_bytes"]).metrics) == (256, 1)
    assert choice_setting(Objective(["accuracy", "latency_ms_b32"]).metrics) == (32, 1)
    obj = Objective(["accuracy", "latency_ms_b8_torch", "speedup_b1_t2"])
    assert choice_setting(obj.metrics) == (1, 2)  # eager-PyTorch timing does not choose forms
