"""Int8 ``MatMulInteger`` with one activation scale *per token* (row), for the ``int8_token`` form.

ONNX Runtime's dynamic quantization (the ``int8`` form) rounds a MatMul's whole input tensor
to uint8 with ONE scale and zero point: a few large activations (BERT's [CLS]/[SEP] rows)
stretch the scale for every other row. Measured on all-MiniLM-L6-v2 with Linear 8-bit + word
embedding 4-bit (torch cosine to the teacher 0.9917, simulated in torch on 96 sentences): one
scale per tensor 0.9859, one symmetric int8 scale per row 0.9893, one asymmetric uint8 scale
and zero point per row 0.9912. This module writes the last one with ONNX operators:

    lo, hi = min(ReduceMin(A, -1), 0), max(ReduceMax(A, -1), 0)    # per row, [..., 1]
    s = max((hi - lo) / 255, tiny);  z = Round(-lo / s)
    Aq = Cast(Clip(Round(A / s) + z, 0, 255), uint8)
    Y = MatMulIntegerToFloat(Aq, Wq, 1, w_scale) * s - (z * s) * (colsum(Wq) * w_scale)

``Wq`` are the weight's exact int8 codes (``K x N``, per-output-channel ``w_scale``), so the only
new error is the 8-bit rounding of each row of activations. ONNX Runtime's ``MatMulInteger``
takes one activation zero point per tensor, so the per-row zero point is folded out of the
integer product with the weight's column sums; ``com.microsoft.MatMulIntegerToFloat`` applies
the weight scales inside the kernel. The rows' quantization is shared by the MatMuls reading
the same input (q/k/v). On one 1440x384 @ 384x1536 product (1 thread) this ran 2.2x faster
than fp32, against 3.7x for ONNX Runtime's fused per-tensor ``DynamicQuantizeMatMul`` and 2.0x
with ``MatMulInteger`` + ``Cast``/``Mul`` (1.75x with opset-21 blocked ``QuantizeLinear``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

if TYPE_CHECKING:
    from autocompress.deploy._lowbit import Coded, _Graph

TINY = 1e-12
MS_DOMAIN = "com.microsoft"


def token8_eligible(c: Coded) -> bool:
    """A uniform per-output-channel weight of <= 8 bits (group-wise scales vary along the
    inner dimension, which one integer product cannot carry)."""
    return c.codebook is None and c.scale is not None and not c.group and c.bits <= 8


def _shared(gr: _Graph, name: str, value: np.ndarray | np.generic) -> str:
    """One initializer per graph for a small constant used by every quantized input."""
    key = f"token8_{name}"
    if key not in gr.token_inputs:
        gr.token_inputs[key] = (gr.const(key, np.asarray(value)),)
    return gr.token_inputs[key][0]


def _quantized_input(gr: _Graph, a_in: str, tag: str, nodes: list) -> tuple[str, ...]:
    """``(Aq, s, z)`` of ``a_in``: uint8 rows, per-row scale and zero point (float); made once
    per input tensor (q/k/v projections read the same one)."""
    cache = gr.token_inputs
    if a_in in cache:
        return cache[a_in]

    def t(name: str) -> str:
        return gr.fresh(f"{tag}_{name}")

    axes = _shared(gr, "axes", np.array([-1], np.int64))
    zero, tiny = _shared(gr, "zero", np.float32(0.0)), _shared(gr, "tiny", np.float32(TINY))
    q255 = _shared(gr, "q255", np.float32(255.0))
    mn, mx, lo, hi, span, s0, s = (t(n) for n in ("mn", "mx", "lo", "hi", "span", "s0", "s"))
    neg, zr, z, r, ar, rz, cl, aq = (t(n) for n in ("neg", "zr", "z", "r", "ar", "rz", "cl", "aq"))
    nodes += [
        helper.make_node("ReduceMin", [a_in, axes], [mn], keepdims=1),
        helper.make_node("ReduceMax", [a_in, axes], [mx], keepdims=1),
        helper.make_node("Min", [mn, zero], [lo]),
        helper.make_node("Max", [mx, zero], [hi]),
        helper.make_node("Sub", [hi, lo], [span]),
        helper.make_node("Div", [span, q255], [s0]),
        helper.make_node("Max", [s0, tiny], [s]),
        helper.make_node("Neg", [lo], [neg]),
        helper.make_node("Div", [neg, s], [zr]),
        helper.make_node("Round", [zr], [z]),
        helper.make_node("Div", [a_in, s], [r]),
        helper.make_node("Round", [r], [ar]),
        helper.make_node("Add", [ar, z], [rz]),
        helper.make_node("Clip", [rz, zero, q255], [cl]),
        helper.make_node("Cast", [cl], [aq], to=onnx.TensorProto.UINT8),
    ]
    cache[a_in] = (aq, s, z)
    return cache[a_in]


def matmul_token8(gr: _Graph, c: Coded, a_in: str, out: str, tag: str):
    """Nodes computing ``a_in @ W^T`` (``W`` = ``c``'s rows) as above, into ``out``."""
    assert c.scale is not None
    codes = np.ascontiguousarray(c.codes.astype(np.int8).T)  # (in, out)
    ws = c.scale.astype(np.float32)
    wq = gr.const(f"{tag}_q8", codes)
    one = _shared(gr, "one", np.float32(1.0))
    cws = gr.const(f"{tag}_cws", (codes.astype(np.float64).sum(0) * ws).astype(np.float32))
    nodes: list[onnx.NodeProto] = []
    ws32 = gr.scales(f"{tag}_ws", ws, nodes)  # fp16 behind a Cast when exact
    aq, s, z = _quantized_input(gr, a_in, tag, nodes)
    yf, zs, ys, corr = (gr.fresh(f"{tag}_{n}") for n in ("yf", "zs", "ys", "corr"))
    nodes += [
        helper.make_node("MatMulIntegerToFloat", [aq, wq, one, ws32], [yf], domain=MS_DOMAIN),
        helper.make_node("Mul", [z, s], [zs]),
        helper.make_node("Mul", [yf, s], [ys]),
        helper.make_node("Mul", [zs, cws], [corr]),
        helper.make_node("Sub", [ys, corr], [out]),
    ]
    return nodes, f"MatMulIntegerToFloat, uint8 activations per token ({c.bits}-bit codes)"
