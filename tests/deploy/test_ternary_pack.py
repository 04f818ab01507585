"""2-bit (ternary) embedding tables in the low-bit ONNX form.

2-bit codes are -1, 0, 1, so packing them at 2 bits wastes a quarter of the file: the form
stores them five a byte base 3 (1.6 bits), or, when fewer than 60% of them are nonzero (trained
tables are mostly zeros at 2 bits), as a nonzero bit per code plus a sign bit per nonzero. Both
are decoded by standard operators that ONNX Runtime folds into the fp32 table at session start:
the table it gathers from must equal the PyTorch model's bit for bit, the graph must be valid
ONNX, no decoding operator may survive the session's optimizations, and the file must shrink.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autocompress.compress import apply
from autocompress.deploy import OnnxModel, deploy_forms
from autocompress.deploy._lowbit import LOWBIT_KEY, pack_ternary, ternary_bytes
from autocompress.spaces._plan import FinetuneSettings, LayerPlan, Plan

NO_FT = FinetuneSettings(epochs=0)
DECODERS = {"BitShift", "BitwiseAnd", "Div", "Mod", "CumSum", "MatMul", "Cast", "Mul", "Sub"}


def _unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """Reference decoding: five base-3 digits a byte, least significant first."""
    digits = [(packed.astype(np.int32) // 3**i) % 3 for i in range(5)]
    return np.stack(digits, axis=1).reshape(-1)[:n]


def test_pack_ternary_round_trips_every_byte_value() -> None:
    every = np.array(np.unravel_index(np.arange(243), (3,) * 5)).T[:, ::-1].reshape(-1)
    packed = pack_ternary(every.astype(np.uint8))
    assert packed.tolist() == list(range(243))  # the 243 digit tuples are the 243 bytes
    rng = np.random.default_rng(0)
    for n in (1, 4, 5, 6, 1001):  # with and without a padded last byte
        u = rng.integers(0, 3, n).astype(np.uint8)
        p = pack_ternary(u)
        assert p.dtype == np.uint8 and p.size == -(-n // 5)
        assert np.array_equal(_unpack(p, n), u)
    with pytest.raises(ValueError, match="ternary"):
        pack_ternary(np.array([0, 3], np.uint8))


def test_ternary_bytes_picks_the_smaller_packing() -> None:
    dense = np.tile([-1, 0, 1], 400)  # a third zeros: 1.67 bits with a mask, 1.6 base 3
    sparse = np.where(np.arange(1200) % 5 == 0, 1, 0)  # 80% zeros: 1.2 bits with a mask
    assert ternary_bytes(dense) == {"base3": 240, "mask": 150 + 101}
    assert ternary_bytes(sparse) == {"base3": 240, "mask": 150 + 31}


class Table(nn.Module):
    """An embedding table alone: the form's output is the decoded table's rows."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(weight.clone(), freeze=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def _weight(kind: str, rows: int, dim: int) -> torch.Tensor:
    """``"thirds"``: -0.5, 0 and 0.5 equally often (codes exactly those levels, a third zeros);
    ``"normal"``: Gaussian rows, which a max-scaled 2-bit grid maps mostly to 0."""
    g = torch.Generator().manual_seed(0)
    if kind == "thirds":
        return (torch.randint(-1, 2, (rows, dim), generator=g) * 0.5).float()
    return torch.randn(rows, dim, generator=g) * 0.02


def _optimized_ops(data: bytes, tmp_path: Path) -> list[str]:
    """The operators left after ONNX Runtime's basic (constant-folding) optimizations."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.mark.parametrize(
    ("kind", "group", "packing"),
    [
        ("thirds", 32, "base 3, 5 a byte"),
        ("thirds", 0, "base 3, 5 a byte"),
        ("normal", 32, "nonzero and sign bits"),
        ("normal", 0, "nonzero and sign bits"),
    ],
)
def test_two_bit_table_is_packed_exact_and_folded(
    kind: str, group: int, packing: str, tmp_path: Path
) -> None:
    rows, dim = 997, 64  # 63808 codes: neither a multiple of 5 nor of 8 bytes' worth of rows
    model = Table(_weight(kind, rows, dim)).eval()
    lp = LayerPlan(bits=2, **({"group": group} if group else {}))  # type: ignore[arg-type]
    q = apply(model, Plan({"emb": lp}, finetune=NO_FT))
    codes = torch.sign(q.emb.weight).detach().numpy()  # positive scales: the codes' signs
    zeros = float((q.emb.weight == 0).float().mean())
    assert (zeros < 0.4) if kind == "thirds" else (zeros > 0.6), zeros
    ids = torch.arange(rows).reshape(1, -1)
    data = deploy_forms(q, ids, int8=False)["lowbit"]
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    how = json.loads({p.key: p.value for p in proto.metadata_props}[LOWBIT_KEY])["emb.weight"]
    suffix = f"{packing}, group {group})" if group else f"{packing})"
    assert how == f"Gather of a table decoded at load from 2-bit packed codes ({suffix}", how
    got = OnnxModel(data).run_numpy(ids.numpy())[0]
    with torch.no_grad():
        want = q(ids).numpy()
    assert np.array_equal(got, want)  # the folded table is the model's, bit for bit
    assert not DECODERS & set(_optimized_ops(data, tmp_path)), _optimized_ops(data, tmp_path)
    n = rows * dim
    scale_bytes = 2 * (rows * dim // group if group else rows)  # fp16
    packed = min(ternary_bytes(codes).values())
    assert packed <= -(-n // 5) < n // 4 - 2048  # at most 1.6 bits a code, not 2
    assert len(data) <= packed + scale_bytes + 2048, (len(data), packed, scale_bytes)
