"""``max_bytes``: "auto" never ships a form larger than the caller's byte budget (a 4-bit model
is not deployed as an int8 file twice its size) unless no form fits."""

from __future__ import annotations

import torch
from torch import nn

from autocompress.compress import apply
from autocompress.deploy import OnnxModel, deploy_forms, onnx_form
from autocompress.deploy._onnx import form_sizes, small_forms
from autocompress.spaces import LayerPlan, Plan


def test_small_forms_honour_the_byte_budget() -> None:
    forms = {"fp32": b"x" * 400, "int8": b"x" * 120, "lowbit": b"x" * 100}
    assert small_forms(forms) == ["lowbit", "int8"]
    assert small_forms(forms, max_bytes=119) == ["lowbit"]
    assert small_forms(forms, max_bytes=50) == ["lowbit"]  # none fits: the smallest alone


def test_auto_with_calibration_ships_no_form_over_the_budget(monkeypatch) -> None:
    """The int8-activation forms are made the fastest by far: without a budget one ships,
    with a budget of the lowbit file's size lowbit ships."""
    import autocompress.deploy._onnx as onnx_mod
    from autocompress.deploy._fidelity import is_exact
    from autocompress.deploy._latency import LatencyStats

    def timed(runners, *a, **k):  # type: ignore[no-untyped-def]
        return {f: LatencyStats(1.0 if is_exact(f) else 0.1, 0.0, 0.0, 7) for f in runners}

    monkeypatch.setattr(onnx_mod, "measure_latency", timed)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    small = apply(net, Plan(layers={"0": LayerPlan(bits=8), "2": LayerPlan(bits=4, group=32)}))
    x = torch.randn(64, 256)
    sizes = form_sizes(deploy_forms(small, x, int8=True, lowbit=True))
    assert {"int8", "lowbit"} <= set(sizes) and sizes["int8"] > sizes["lowbit"]
    kw = {"batch_size": 64, "calibration": x, "check": lambda om: True}
    free = OnnxModel(onnx_form(small, x, **kw)).form
    assert not is_exact(free) and sizes[free] > sizes["lowbit"]  # the budget is what binds
    data = onnx_form(small, x, **kw, max_bytes=sizes["lowbit"])
    assert OnnxModel(data).form == "lowbit" and len(data) == sizes["lowbit"]
