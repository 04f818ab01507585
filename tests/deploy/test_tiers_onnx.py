"""ONNX forms of a model whose embedding is split into hot and cold rows (``hot_rows``).

The graph looks each id up in an int32 slot table, then gathers from the hot and the cold
table; the low-bit form must store both tables as their own codes (each matched by value to its
quant record), ship, reproduce the PyTorch outputs within the exporter's tolerances, and stay
within 1.25x of the artifact's ``size_bytes`` when the embedding dominates the model (a 2-bit
cold table too: its ternary codes are not stored at 2 bits, see ``test_ternary_pack``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from autocompress.artifacts import export, load
from autocompress.compress import TieredEmbedding, apply
from autocompress.deploy import OnnxModel, deploy_forms
from autocompress.deploy._export import ATOL, RTOL
from autocompress.deploy._lowbit import LOWBIT_KEY
from autocompress.spaces._discover import discover_layers
from autocompress.spaces._plan import FinetuneSettings, LayerPlan, Plan

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

VOCAB, HIDDEN = 2000, 128
WORD = "embeddings.word_embeddings"
NO_FT = FinetuneSettings(epochs=0)


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    """A 1-layer BertModel whose 2000-row word embedding holds most of the weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def _counts() -> torch.Tensor:
    """A scattered ranking (hot rows are not a prefix of the table)."""
    return ((torch.arange(VOCAB) * 7919) % VOCAB).double()


def _plan(model: nn.Module, word: LayerPlan) -> Plan:
    """Every Linear and the small embeddings at 4 bits, groups of 32; ``word`` for the table."""
    layers = {i.name: LayerPlan(bits=4, group=32) for i in discover_layers(model)[0]}
    return Plan({**layers, WORD: word}, finetune=NO_FT)


def _inputs(n: int, seed: int, hot: torch.Tensor) -> dict[str, torch.Tensor]:
    """Random ids with padding, and the first hot rows and cold rows 0..2 certainly present."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 12), generator=g)
    ids[0, :4] = hot[:4]
    ids[1, :3] = torch.tensor([1, 2, VOCAB - 1])
    ids[:, -3:] = 0
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _out(y: object) -> torch.Tensor:
    if isinstance(y, dict):
        return next(iter(y.values()))
    return y if isinstance(y, torch.Tensor) else y[0]  # type: ignore[index]


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    atol = ATOL * max(1.0, float(want.abs().max()))
    assert torch.allclose(got, want, rtol=RTOL, atol=atol), float((got - want).abs().max())


def _slot_tables(proto: onnx.ModelProto) -> list[np.ndarray]:
    """Int32 vectors of ``VOCAB`` entries held by the graph (initializers or Constants)."""
    arrays = [numpy_helper.to_array(i) for i in proto.graph.initializer]
    for n in proto.graph.node:
        if n.op_type == "Constant":
            arrays += [numpy_helper.to_array(a.t) for a in n.attribute if a.name == "value"]
    return [a for a in arrays if a.dtype == np.int32 and a.shape == (VOCAB,)]


@pytest.mark.parametrize(
    ("bits", "hot_bits", "cold_how", "hot_how"),
    [
        (2, 4, "Gather of a table decoded at load from 2-bit", "GatherBlockQuantized 4-bit"),
        (3, 8, "Gather of a table decoded at load from 3-bit", "GatherBlockQuantized 8-bit"),
        (4, 8, "GatherBlockQuantized 4-bit", "GatherBlockQuantized 8-bit"),
    ],
)
def test_lowbit_form_ships_with_both_tables_and_matches_torch(
    bert: nn.Module, bits: int, hot_bits: int, cold_how: str, hot_how: str, tmp_path: Path
) -> None:
    word = LayerPlan(bits=bits, group=32, hot_rows=0.05, hot_bits=hot_bits)
    plan = _plan(bert, word)
    q = apply(bert, plan, row_counts={WORD: _counts()})
    t = q.embeddings.word_embeddings
    assert isinstance(t, TieredEmbedding)
    hot = t.hot_mask.nonzero().flatten()
    x = _inputs(4, 0, hot)
    art = export(q, plan, tmp_path / "a", onnx_example=x)
    proto = onnx.load(art.path / "model.onnx")
    assert OnnxModel(art.path / "model.onnx").form == "lowbit"
    how = json.loads({p.key: p.value for p in proto.metadata_props}[LOWBIT_KEY])
    assert how[f"{WORD}.cold.weight"].startswith(cold_how), how
    assert how[f"{WORD}.hot.weight"].startswith(hot_how), how
    kept = {k for k, v in how.items() if v.startswith("fp32")}
    assert kept == {"pooler.dense.weight"}, how  # the pooler's output is not the exported one
    slots = _slot_tables(proto)
    assert len(slots) == 1 and np.array_equal(slots[0], t.slot.numpy())
    om = load(art.path, runtime="onnxruntime")
    for batch in (x, _inputs(3, 1, hot)):  # the export batch and another one
        with torch.no_grad():
            want = q(**batch).last_hidden_state
        _assert_close(_out(om(**batch)), want)
    # 2-bit cold tables too: their ternary codes are stored at <= 1.6 bits (test_ternary_pack)
    assert art.files["model.onnx"] <= 1.25 * art.size_bytes, (
        art.files["model.onnx"],
        art.size_bytes,
    )


def test_tiers_add_little_to_a_two_bit_table(bert: nn.Module, tmp_path: Path) -> None:
    """The split costs the lowbit form only the hot rows' extra bits and the 4-byte slot per
    row: a hot code takes 4 bits in place of the at least one bit (a nonzero bit, plus a sign
    bit for a nonzero code; five codes a byte base 3 when that is smaller) it took in the cold
    table."""
    sizes = {}
    for name, word in {
        "flat": LayerPlan(bits=2, group=32),
        "tiered": LayerPlan(bits=2, group=32, hot_rows=0.05, hot_bits=4),
    }.items():
        plan = _plan(bert, word)
        q = apply(bert, plan, row_counts={WORD: _counts()})
        forms = deploy_forms(q, _inputs(2, 0, torch.arange(4)), int8=False)
        assert sorted(forms) == ["fp32", "lowbit"]
        sizes[name] = len(forms["lowbit"])
    hot = 100  # 5% of 2000 rows
    extra = hot * HIDDEN * (4 - 1) // 8 + 4 * VOCAB  # hot codes' <= 3 more bits + int32 slots
    assert 0 < sizes["tiered"] - sizes["flat"] <= extra + 2048, (sizes, extra)


def test_every_form_runs(bert: nn.Module) -> None:
    """The int8 form too (dynamic int8 Linear layers, the tables' Gathers as low-bit ones)."""
    word = LayerPlan(bits=2, group=32, hot_rows=0.05, hot_bits=8)
    q = apply(bert, _plan(bert, word), row_counts={WORD: _counts()})
    hot = q.embeddings.word_embeddings.hot_mask.nonzero().flatten()
    x = _inputs(3, 2, hot)
    forms = deploy_forms(q, x)
    assert {"fp32", "lowbit"} <= set(forms)
    with torch.no_grad():
        want = q(**x).last_hidden_state
    for name, data in forms.items():
        got = _out(OnnxModel(data)(**x))
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        if name in ("fp32", "lowbit"):  # the exact forms
            _assert_close(got, want)
