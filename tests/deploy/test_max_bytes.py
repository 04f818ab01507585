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


def test_auto_with_calibration_ships_no_form_over_the_budget() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    small = apply(net, Plan(layers={"0": LayerPlan(bits=8), "2": LayerPlan(bits=4, group=32)}))
    x = torch.randn(64, 256)
    sizes = form_sizes(deploy_forms(small, x, int8=True, lowbit=True))
    assert {"int8", "lowbit"} <= set(sizes) and sizes["int8"] > sizes["lowbit"]
    kw = {"batch_size": 64, "calibration": x, "check": lambda om: True}
    data = onnx_form(small, x, **kw, max_bytes=sizes["lowbit"])
    assert OnnxModel(data).form == "lowbit" and len(data) == sizes["lowbit"]
