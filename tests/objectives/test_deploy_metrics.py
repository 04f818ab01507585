"""Deployment metrics: latency/speedup names and settings, the shared cache, MACs, ONNX bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import autocompress.deploy as deploy
from autocompress import ConfigError, Task
from autocompress.artifacts import export
from autocompress.compress import apply
from autocompress.errors import AutocompressError
from autocompress.objectives import (
    LatencySettings,
    Metric,
    Objective,
    get_metric,
    is_metric_name,
    latency_metric,
    metric_names,
    speedup_metric,
)
from autocompress.objectives._deploy import _CACHE
from autocompress.spaces import Plan
from autocompress.spaces._plan import FinetuneSettings

QUICK = {"repeats": 5, "warmup": 1}


def tiny_task() -> Task:
    torch.manual_seed(0)
    x, y = torch.randn(80, 32), torch.randint(0, 4, (80,))
    teacher = nn.Sequential(nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, 4)).eval()
    return Task.from_module(teacher, (x, y), (x, y), (x, y))


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


@pytest.fixture
def count_calls(monkeypatch):
    """Count calls of deploy's latency_and_speedup and deploy_forms (what the metrics use)."""
    calls = {"latency_and_speedup": 0, "deploy_forms": 0}

    def wrap(name):
        real = getattr(deploy, name)

        def counted(*a, **k):
            calls[name] += 1
            return real(*a, **k)

        monkeypatch.setattr(deploy, name, counted)

    wrap("latency_and_speedup")
    wrap("deploy_forms")
    return calls


# --- names and settings ------------------------------------------------------------------------
def test_builtin_deployment_metrics_are_registered() -> None:
    names = set(metric_names())
    assert {"latency_ms", "speedup", "macs", "bitops", "onnx_bytes"} <= names
    directions = {n: get_metric(n).direction for n in ("latency_ms", "speedup", "macs")}
    assert directions == {"latency_ms": "minimize", "speedup": "maximize", "macs": "minimize"}
    assert get_metric("onnx_bytes").direction == get_metric("bitops").direction == "minimize"


@pytest.mark.parametrize(
    ("name", "batch", "threads", "runtime"),
    [
        ("latency_ms", 256, 1, "onnxruntime"),
        ("latency_ms_b1", 1, 1, "onnxruntime"),
        ("speedup_b256", 256, 1, "onnxruntime"),
        ("latency_ms_b64_t2", 64, 2, "onnxruntime"),
        ("speedup_b1_torch", 1, 1, "torch"),
        ("latency_ms_torch", 256, 1, "torch"),
        ("speedup_t4", 256, 4, "onnxruntime"),
    ],
)
def test_parametrized_names(name: str, batch: int, threads: int, runtime: str) -> None:
    m = get_metric(name)
    assert m.name == name and is_metric_name(name)
    assert m.fn.settings == LatencySettings(batch=batch, runtime=runtime, threads=threads)
    assert m.direction == ("minimize" if name.startswith("latency") else "maximize")


@pytest.mark.parametrize("name", ["latency", "latency_ms_b0", "latency_ms_b1_ort", "speedup_x"])
def test_bad_latency_names_are_unknown(name: str) -> None:
    assert not is_metric_name(name)
    with pytest.raises(ConfigError, match=r"unknown metric .*'latency_ms_b1_torch'"):
        get_metric(name)


def test_python_factories_and_validation() -> None:
    m = latency_metric(batch=1, runtime="torch", repeats=50, name="lat1")
    assert (m.name, m.fn.settings.repeats, m.fn.settings.runtime) == ("lat1", 50, "torch")
    assert speedup_metric(batch=32, threads=2).name == "speedup_b32_t2"
    assert latency_metric().name == "latency_ms" and speedup_metric().name == "speedup"
    for bad, match in [
        ({"batch": 0}, "batch=0"),
        ({"runtime": "tvm"}, "runtime='tvm' is unknown"),
        ({"threads": 1.5}, "threads=1.5"),
        ({"max_seconds": -1.0}, "max_seconds"),
    ]:
        with pytest.raises(ConfigError, match=match):
            latency_metric(**bad)


def test_constraints_may_name_parametrized_metrics() -> None:
    obj = Objective(["accuracy", "size_bytes"], ["speedup_b256 >= 3", "latency_ms_b1 <= 0.1"])
    assert [c.metric for c in obj.constraints] == ["speedup_b256", "latency_ms_b1"]
    with pytest.raises(ConfigError, match=r"unknown metric 'speedup_b': .*latency_ms_b1"):
        Objective(["accuracy"], ["speedup_b >= 3"])


# --- measurement and cache -----------------------------------------------------------------------
def test_one_measurement_shared_by_latency_speedup_and_details(count_calls) -> None:
    task, model = tiny_task(), small_model()
    lat = latency_metric(batch=64, **QUICK)
    spd = speedup_metric(batch=64, **QUICK)
    vals = Objective(["accuracy", lat, spd]).evaluate(model, None, task)
    assert count_calls == {"latency_and_speedup": 1, "deploy_forms": 1}
    assert vals["latency_ms_b64"] > 0 and vals["speedup_b64"] > 1.5  # 8 vs 1024 hidden units
    for k in (
        "latency_iqr_ms_b64",
        "speedup_iqr_b64",
        "teacher_latency_ms_b64",
        "onnx_int8_b64",
        "onnx_lowbit_b64",
    ):
        assert k in vals
    assert vals["teacher_latency_ms_b64"] > vals["latency_ms_b64"]
    # another batch size: a new timing, but the ONNX export is reused
    get_metric("latency_ms_b1")(model, None, task)
    assert count_calls == {"latency_and_speedup": 2, "deploy_forms": 1}
    get_metric("onnx_bytes")(model, None, task)
    assert count_calls["deploy_forms"] == 1


def test_changed_weights_invalidate_the_cache(count_calls) -> None:
    task, model = tiny_task(), small_model()
    lat = latency_metric(batch=8, **QUICK)
    lat(model, None, task)
    lat(model, None, task)
    assert count_calls["latency_and_speedup"] == 1
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # in place: the cached export no longer describes it
    lat(model, None, task)
    assert count_calls == {"latency_and_speedup": 2, "deploy_forms": 2}


def test_cache_dies_with_the_model() -> None:
    task, model = tiny_task(), small_model()
    latency_metric(batch=8, **QUICK)(model, None, task)
    assert model in _CACHE
    n = len(_CACHE)
    del model
    import gc

    gc.collect()
    assert len(_CACHE) == n - 1


def test_torch_runtime(count_calls) -> None:
    task, model = tiny_task(), small_model()
    vals = Objective([speedup_metric(batch=256, runtime="torch", **QUICK)]).evaluate(
        model, None, task
    )
    assert vals["speedup_torch"] > 1.5 and "onnx_int8_torch" not in vals
    assert count_calls["deploy_forms"] == 0


def test_unexportable_model_fails_clearly_once(monkeypatch) -> None:
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise AutocompressError("the model cannot be exported to ONNX (trace: boom): fix it")

    monkeypatch.setattr(deploy, "deploy_forms", broken)
    task, model = tiny_task(), small_model()
    for metric in (get_metric("latency_ms"), get_metric("speedup"), get_metric("onnx_bytes")):
        with pytest.raises(AutocompressError, match=r"cannot be exported .*'latency_ms_torch'"):
            metric(model, None, task)
    assert len(calls) == 1  # the failure is cached with the model, not retried per metric


def test_loaded_onnx_model_is_timed_as_is(tmp_path: Path) -> None:
    task, model = tiny_task(), small_model()
    deploy.to_onnx(model, task.example_input(), tmp_path / "m.onnx", int8=False)
    om = deploy.load_onnx(tmp_path / "m.onnx")
    assert latency_metric(batch=16, **QUICK)(om, None, task) > 0
    with pytest.raises(AutocompressError, match="nn.Module"):
        get_metric("macs")(om, None, task)


# --- analytic cost and ONNX bytes ------------------------------------------------------------
def test_macs_and_bitops_per_example(digits_mlp: Task) -> None:
    teacher = digits_mlp.teacher()
    assert get_metric("macs")(teacher, None, digits_mlp) == 64 * 300 + 300 * 100 + 100 * 10
    plan = Plan.uniform(["fc1", "fc2", "fc3"], bits=4, finetune=FinetuneSettings(epochs=0))
    small = apply(teacher, plan, digits_mlp)
    b = get_metric("bitops")(small, None, digits_mlp)
    assert (
        b
        == deploy.bitops(small, digits_mlp.example_input(1))
        == (64 * 300 + 300 * 100 + 100 * 10) * 4 * 8
    )


def test_onnx_bytes_is_the_deployment_file(digits_mlp: Task, tmp_path: Path) -> None:
    plan = Plan.uniform(["fc1", "fc2", "fc3"], bits=8, finetune=FinetuneSettings(epochs=0))
    small = apply(digits_mlp.teacher(), plan, digits_mlp)
    art = export(small, plan, tmp_path / "a", onnx_example=digits_mlp.example_input())
    metric = get_metric("onnx_bytes")
    assert metric(small, art, digits_mlp) == (art.path / "model.onnx").stat().st_size
    no_onnx = export(small, plan, tmp_path / "b")
    measured = metric(small, no_onnx, digits_mlp)
    forms = deploy.deploy_forms(small, digits_mlp.example_input())
    assert measured in {float(len(f)) for f in forms.values()}
    # an int8 form stores the 8-bit Linear weights in one byte each: far below fp32's four
    assert len(forms["int8"]) < 0.4 * len(forms["fp32"])


def test_metric_details_never_replace_values() -> None:
    m = Metric("a", "max", lambda *_: 1.0, details=lambda *_: {"a": 5.0, "b": 2.0, "c": 3.0})
    n = Metric("b", "min", lambda *_: 7.0)
    vals = Objective([m, n]).evaluate(small_model(), None, tiny_task())
    assert (vals["a"], vals["b"], vals["c"]) == (1.0, 7.0, 3.0)
    with pytest.raises(ConfigError, match="details must be callable"):
        Metric("d", "max", lambda *_: 1.0, details=3)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _stub_size(monkeypatch):
    """Objective.evaluate always adds size_bytes; give artifact-less tests a fixed size."""
    from autocompress.objectives import _metric

    stub = Metric(
        "size_bytes", "minimize", lambda m, a, t: float(a.size_bytes) if a is not None else 0.0
    )
    monkeypatch.setitem(_metric._REGISTRY, "size_bytes", stub)


# --- dict batches (Hugging Face style) -----------------------------------------------------------
class TokenClassifier(nn.Module):
    """``model(input_ids=..., attention_mask=...)`` -> ``{"logits": ..., "hidden": ...}``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, width)
        self.head = nn.Linear(width, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        hidden = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return {"hidden": hidden, "logits": self.head(hidden)}


def test_deployment_metrics_on_dict_batches() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (40, 7))
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0
    data = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 4, (40,))}
    task = Task.from_module(TokenClassifier(256).eval(), data, data, data)
    model = TokenClassifier(16).eval()
    assert isinstance(task.example_input(), dict)
    vals = Objective(["macs", "bitops", latency_metric(batch=8, **QUICK), "onnx_bytes"]).evaluate(
        model, None, task
    )
    assert vals["macs"] == 16 * 4  # the head (the embedding is a lookup), per example
    assert vals["bitops"] == 16 * 4 * 32 * 32
    assert vals["latency_ms_b8"] > 0 and vals["speedup_b8"] > 0 and vals["onnx_bytes"] > 0
    om = deploy.OnnxModel(deploy.onnx_form(model, task.example_input(), int8=False))
    assert [n for n, _ in om.inputs] == ["input_ids", "attention_mask"]
    assert task.evaluate(om, "val") == task.evaluate(model, "val")  # Task scores it by name
