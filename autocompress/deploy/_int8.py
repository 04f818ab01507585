"""int8 forms of an fp32 ONNX graph, for the layers the plan quantized to <= 8 bits.

ONNX Runtime's dynamic quantization (``quantize_dynamic``: int8 symmetric per-channel weights,
uint8 activations quantized per tensor at run time) is applied only to the nodes whose weight is a
parameter with a uniform :class:`~autocompress.compress.QuantRecord` of <= 8 bits, so a layer the
plan kept at 16 or 32 bits (or shared through a codebook) keeps its exact values. The engine
already put the selected weights on a symmetric per-channel grid of at most 255 levels, so the
int8 weights hold exactly the same codes; the only new error is the 8-bit rounding of
activations.

Nodes are matched to parameters by value (the initializer equals the weight, its transpose, or
the weight with rescaled output channels where the exporter folded a BatchNorm into a conv, which
leaves per-channel codes unchanged), so the match works whichever exporter wrote the graph. The
per-channel scales are passed to ONNX Runtime (``TensorQuantOverrides``), so a 2..7-bit weight
keeps its codes too instead of being re-gridded onto 255 levels.

Only MatMul/Gemm nodes (Linear layers, attention output projections) are quantized; convolutions
stay fp32. ONNX Runtime's dynamic ``ConvInteger`` path quantizes weights per tensor (so it cannot
keep per-channel codes) and was 2.7x slower than its fp32 convolution on mnist1d-cnn at batch 256
(13.0 ms vs 4.8 ms, 1 thread).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from autocompress.compress._meta import QuantRecord, quant_records
from autocompress.deploy._deps import onnxruntime
from autocompress.deploy._export import set_form, set_meta

_LINEAR_OPS = ("MatMul", "Gemm")


@dataclass
class _Weight:
    """A low-bit torch weight: its values, output-channel-normalized rows and max code."""

    w: np.ndarray
    unit: np.ndarray
    max_code: np.ndarray  # per output channel, max |code|
    scale: np.ndarray  # per output channel, the record's scale


@dataclass
class Target:
    """A node the int8 form quantizes, with the exact per-channel scales of its weight."""

    op: str
    tensor: str
    axis: int
    scales: np.ndarray


def _unit_rows(w: np.ndarray) -> np.ndarray:
    """``w`` with each output channel (dim 0) divided by its largest-magnitude entry."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    pivot = rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)]
    return rows / np.where(pivot == 0, 1.0, pivot)[:, None]


def int8_eligible(record: QuantRecord | None) -> bool:
    """True for a weight the int8 form runs in int8: uniform scheme, <= 8 bits, one scale per
    output channel.

    Codebook weights (arbitrary centroids) are not on a uniform grid, and group-wise weights
    have several scales per channel (ONNX Runtime's int8 weights take one), so int8 would change
    them; the int8 form carries them as the low-bit form does (``_lowbit``).
    """
    return (
        record is not None
        and record.scheme == "uniform"
        and record.bits <= 8
        and not getattr(record, "group", 0)
    )


def _low_bit_weights(model: nn.Module) -> list[_Weight]:
    params = dict(model.named_parameters())
    out = []
    for name, rec in quant_records(model).items():
        if int8_eligible(rec) and name in params and rec.scale is not None:
            # channels on dim 0 (HF Conv1D stores its weight (in, out): rec.axis == 1)
            w = np.moveaxis(params[name].detach().cpu().numpy(), rec.axis, 0)
            scale = rec.scale.detach().cpu().numpy().astype(np.float64)
            amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
            out.append(_Weight(w, _unit_rows(w), np.round(amax / scale), scale))
    return out


def _channel_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of the node's weight: 0 for Gemm(transB=1), 1 for MatMul."""
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        return 0 if attrs.get("transB", 0) == 1 else 1
    return 1


def _exact_scales(a: np.ndarray, axis: int, weights: list[_Weight]) -> np.ndarray | None:
    """Per-channel scales putting ``a`` exactly on its integer codes, or None if no match.

    ``a`` (channels on ``axis``) matches a weight if it equals it or has rescaled output
    channels (an exporter folded a following BatchNorm into it: same codes, new scale).
    """
    rows = np.moveaxis(a, axis, 0)
    for wt in weights:
        if rows.shape != wt.w.shape:
            continue
        if np.array_equal(rows, wt.w):
            return wt.scale
        if np.allclose(_unit_rows(rows), wt.unit, atol=1e-5):
            amax = np.abs(rows.reshape(rows.shape[0], -1)).max(axis=1).astype(np.float64)
            return np.where(wt.max_code > 0, amax / np.maximum(wt.max_code, 1), wt.scale)
    return None


def targets(proto: onnx.ModelProto, model: nn.Module) -> dict[str, Target]:
    """``{node name: Target}`` of the nodes whose constant weight is a uniform <= 8-bit parameter.

    Unnamed nodes get unique names (in place) so they can be selected.
    """
    weights = _low_bit_weights(model)
    if not weights:
        return {}
    inits = {i.name: i for i in proto.graph.initializer}
    names = {n.name for n in proto.graph.node}
    out: dict[str, Target] = {}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"ac_{node.op_type}_{i}"
            while node.name in names:
                node.name += "_"
            names.add(node.name)
        if node.op_type not in _LINEAR_OPS or len(node.input) < 2:
            continue
        init = inits.get(node.input[1])
        if init is None:
            continue
        a, axis = numpy_helper.to_array(init), _channel_axis(node)
        if a.ndim != 2:
            continue
        scales = _exact_scales(a, axis, weights)
        if scales is not None:
            out[node.name] = Target(node.op_type, init.name, axis, scales)
    return out


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantizer logs through the root logger; keep that out of user output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize(proto: onnx.ModelProto, chosen: dict[str, Target]) -> onnx.ModelProto:
    onnxruntime("int8 quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # A Gemm is rewritten to MatMul + Add named "<name>_MatMul" before quantization (its weight
    # transposed, the override axis flipped by ONNX Runtime).
    selected = list(chosen) + [f"{n}_MatMul" for n, t in chosen.items() if t.op == "Gemm"]
    overrides = {
        t.tensor: [{"axis": t.axis, "scale": np.float32(s), "zero_point": 0} for s in t.scales]
        for t in chosen.values()
    }
    with tempfile.TemporaryDirectory(prefix="autocompress-int8-") as tmp, _quiet_root_logger():
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(proto, pre, skip_optimization=True, skip_symbolic_shape=True)
        quantize_dynamic(
            pre,
            out,
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=selected,
            op_types_to_quantize=["MatMul"],
            extra_options={"TensorQuantOverrides": overrides},
        )
        return onnx.load(out)


def int8_form(proto: onnx.ModelProto, model: nn.Module) -> onnx.ModelProto | None:
    """The int8 form of ``proto``, or None when no Linear-type layer is uniform <= 8 bits.

    ``proto`` is the fp32 export of ``model`` (:func:`export_fp32`); node names may be filled in.
    """
    nodes = targets(proto, model)
    if not nodes:
        return None
    q = _quantize(proto, nodes)
    set_meta(q, {p.key: p.value for p in proto.metadata_props})  # input/output forms
    return set_form(q, "int8")
