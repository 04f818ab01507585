"""Deployment form and measured cost: ONNX export (fp32, low-bit, int8), ONNX Runtime, latency.

* :func:`to_onnx` writes the deployment form of a (compressed) model: an exact form (fp32 or
  the artifact's own low-bit codes) unless calibration data show that a form with int8
  activations holds fidelity (``calibration=``, ``check=``, ``tolerance=``); :func:`load_onnx` /
  :class:`OnnxModel` run it with ONNX Runtime behind a torch-like call.
* :func:`measure_latency` times callables interleaved (round robin) and reports median, IQR and
  coefficient of variation; :func:`latency_and_speedup` times a model against its dense teacher
  in the same process and runtime.
* :func:`macs` and :func:`bitops` are the analytic costs.

Inputs are taken the way the model is called: a tensor, a tuple, or a dict of tensors (Hugging
Face ``input_ids``/``attention_mask`` ...: ONNX inputs named after the keys, dynamic batch and
sequence axes); a dict or ``ModelOutput`` answer is exported as one field (``output=``, default
``logits``). See docs/objectives.md, "Models as they come".

Example:
    >>> import tempfile, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> om = load_onnx(to_onnx(net, torch.randn(4, 8), tempfile.mkdtemp() + "/net.onnx"))
    >>> x = torch.randn(3, 8)
    >>> bool(torch.allclose(om(x), net(x), atol=1e-5)), macs(net, x)
    (True, 480)
"""

from __future__ import annotations

from autocompress.deploy._export import export_fp32
from autocompress.deploy._latency import LatencyStats, measure_latency, paired_ratio
from autocompress.deploy._macs import Product, bitops, macs, products
from autocompress.deploy._onnx import deploy_forms, onnx_form, tile_batch, to_onnx
from autocompress.deploy._runtime import OnnxModel, load_onnx
from autocompress.deploy._speedup import latency_and_speedup, teacher_onnx

__all__ = [
    "LatencyStats",
    "OnnxModel",
    "Product",
    "bitops",
    "deploy_forms",
    "export_fp32",
    "latency_and_speedup",
    "load_onnx",
    "macs",
    "measure_latency",
    "onnx_form",
    "paired_ratio",
    "products",
    "teacher_onnx",
    "tile_batch",
    "to_onnx",
]
