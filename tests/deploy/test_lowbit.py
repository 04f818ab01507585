"""The low-bit ONNX form: the artifact's own codes in ONNX Runtime kernels, exact vs PyTorch.

MatMulNBits (Linear) and GatherBlockQuantized (embeddings) at 4 and 8 bits, per-channel and
group-wise records, DequantizeLinear / codebook fallbacks, the size of the file against the
artifact's ``size_bytes``, and forms that do not reproduce the fp32 graph are not shipped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import autocompress.deploy._onnx as onnx_mod
from autocompress._zoo import ZOO, zoo_inputs
from autocompress.artifacts import export
from autocompress.compress import QuantRecord, apply
from autocompress.compress._meta import fp16_exact, quant_records, set_quant_records
from autocompress.deploy import OnnxModel, deploy_forms, export_fp32, onnx_form, to_onnx
from autocompress.deploy._export import ATOL, RTOL
from autocompress.deploy._lowbit import LOWBIT_KEY, lowbit_form
from autocompress.errors import AutocompressError
from autocompress.spaces import Plan
from autocompress.spaces._discover import discover_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")


def _bert(vocab: int | None = None, hidden: int = 64) -> nn.Module:
    if vocab is None:
        return ZOO["bert"].build()
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def _plan(model: nn.Module, linear: int, embedding: int) -> Plan:
    layers = discover_layers(model)[0]
    base = Plan.uniform([i.name for i in layers], bits=linear)
    emb = {i.name for i in layers if "embeddings" in i.name}
    lp = Plan.uniform(sorted(emb), bits=embedding).layers
    return Plan(layers={**base.layers, **lp})


def _out(y):
    if isinstance(y, dict):
        return next(iter(y.values()))
    return y if isinstance(y, torch.Tensor) else y[0]


def _torch_out(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        y = model(**x)
    return y.logits if hasattr(y, "logits") and y.logits is not None else y.last_hidden_state


def _assert_exact(data: bytes, model: nn.Module, x) -> None:
    got, want = _out(OnnxModel(data)(**x)), _torch_out(model, x)
    atol = ATOL * max(1.0, float(want.abs().max()))
    assert torch.allclose(got, want, rtol=RTOL, atol=atol), float((got - want).abs().max())


def _ops(data: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(data).graph.node]


@pytest.mark.parametrize("bits", [4, 8])
def test_zoo_bert_lowbit_is_exact_per_channel(bits: int) -> None:
    model = _bert()
    q = apply(model, _plan(model, bits, bits))
    x = zoo_inputs("bert", 3)
    forms = deploy_forms(q, x, int8=False)
    assert sorted(forms) == ["fp32", "lowbit"]
    ops = _ops(forms["lowbit"])
    assert ops.count("MatMulNBits") == (14 if bits == 4 else 0)  # 8-bit: decoded at load
    assert ops.count("GatherBlockQuantized") == 3
    g = onnx.load_from_string(forms["lowbit"]).graph
    consts = {i.name for i in g.initializer}
    dense = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in consts]
    assert not dense  # every Linear runs on its codes (attention's activation MatMuls remain)
    meta = {p.key: p.value for p in onnx.load_from_string(forms["lowbit"]).metadata_props}
    how = json.loads(meta[LOWBIT_KEY])
    assert len(how) == 17 and not any(v.startswith("fp32") for v in how.values())
    assert how["bert.embeddings.word_embeddings.weight"].startswith(f"GatherBlockQuantized {bits}")
    _assert_exact(forms["lowbit"], q, zoo_inputs("bert", 5, seed=1))  # another batch
    assert OnnxModel(forms["lowbit"]).form == "lowbit"


def _groupwise(model: nn.Module, bits: int, group: int) -> nn.Module:
    """Bake every Linear/Embedding weight onto a group-wise grid by hand, with its records
    (the contract of ``QuantRecord.group``: scales (out, ceil(in / group)), fp16-exact)."""
    qmax = 2 ** (bits - 1) - 1
    records = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, nn.Linear | nn.Embedding):
                continue
            w = m.weight
            out, n_in = w.shape
            pad = -n_in % group
            a = torch.nn.functional.pad(w.abs(), (0, pad)).reshape(out, -1, group).amax(2)
            scale = fp16_exact(a / qmax)  # 0 for an all-zero group (BERT's padding row)
            full = scale.repeat_interleave(group, dim=1)[:, :n_in]
            codes = torch.where(full > 0, torch.round(w / full.clamp(min=1e-30)), 0.0)
            w.copy_(torch.clamp(codes, -qmax, qmax) * full)
            records[f"{name}.weight"] = QuantRecord(bits, "uniform", scale=scale, group=group)
    set_quant_records(model, records)
    return model


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (8, 32), (3, 16)])
def test_groupwise_records_keep_their_groups(bits: int, group: int) -> None:
    model = _groupwise(_bert(vocab=256, hidden=48), bits, group)
    x = zoo_inputs("bert", 3)
    forms = deploy_forms(model, x, int8=False)
    meta = {p.key: p.value for p in onnx.load_from_string(forms["lowbit"]).metadata_props}
    how = json.loads(meta[LOWBIT_KEY])
    slot = 4 if bits <= 4 else 8
    assert how["encoder.layer.0.intermediate.dense.weight"] == (
        f"MatMulNBits {slot}-bit, block {group} (group {group})"
        if slot == 4
        else f"MatMul on int8 codes decoded at load ({bits}-bit, group {group})"
    )
    assert how["embeddings.word_embeddings.weight"] == (
        f"GatherBlockQuantized {slot}-bit, block {group} (group {group})"
        if bits in (4, 8)
        else f"Gather of a table decoded at load from {bits}-bit packed codes (group {group})"
    )
    # 48 inputs in groups of 32: the last block is partial, as the record's last scale
    _assert_exact(forms["lowbit"], model, zoo_inputs("bert", 4, seed=2))


@pytest.mark.parametrize("bits", [4, 8])
def test_engine_groupwise_plan_is_exact(bits: int, tmp_path: Path) -> None:
    """Group-wise records made by the engine (Plan group=32): blocks = groups, exact."""
    model = _bert()
    layers = [i.name for i in discover_layers(model)[0]]
    plan = Plan.uniform(layers, bits=bits, group=32)
    q = apply(model, plan)
    assert {r.group for r in quant_records(q).values()} == {32}
    x = zoo_inputs("bert", 3)
    forms = deploy_forms(q, x, int8=False)
    how = json.loads(
        {p.key: p.value for p in onnx.load_from_string(forms["lowbit"]).metadata_props}[LOWBIT_KEY]
    )
    assert not any(v.startswith("fp32") for v in how.values())
    assert how["bert.embeddings.word_embeddings.weight"].endswith("block 32 (group 32)")
    _assert_exact(forms["lowbit"], q, zoo_inputs("bert", 5, seed=1))


def test_size_within_the_artifact_budget(tmp_path: Path) -> None:
    """Linear 4-bit + embeddings 4-bit: model.onnx within 1.25x of the artifact's size_bytes."""
    model = _bert(vocab=2000, hidden=128)
    plan = _plan(model, 4, 4)
    q = apply(model, plan)
    x = zoo_inputs("bert", 4)
    art = export(q, plan, tmp_path / "a", onnx_example=x)
    onnx_bytes = art.files["model.onnx"]
    assert OnnxModel(art.path / "model.onnx").form == "lowbit"
    assert onnx_bytes <= 1.25 * art.size_bytes, (onnx_bytes, art.size_bytes)
    fp32 = len(export_fp32(q, x).SerializeToString())
    assert onnx_bytes < 0.2 * fp32


def test_auto_ships_the_small_form_for_a_4bit_plan(tmp_path: Path) -> None:
    """The int8 form holds 8 bits per Linear weight: 2x the 4-bit codes, so 'auto' cannot
    ship it, and fp32 even less (whichever is faster)."""
    model = _bert(vocab=500, hidden=64)
    q = apply(model, _plan(model, 4, 4))
    x = zoo_inputs("bert", 2)
    forms = deploy_forms(q, x)
    assert len(forms["int8"]) > 1.25 * len(forms["lowbit"])
    assert "GatherBlockQuantized" in _ops(forms["int8"])  # int8 Linear, low-bit embeddings
    path = to_onnx(q, x, tmp_path / "m.onnx", batch_size=4)
    assert OnnxModel(path).form == "lowbit"
    assert onnx_form(q, x, form="int8") == forms["int8"]
    with pytest.raises(AutocompressError, match="form='int4' is unknown"):
        onnx_form(q, x, form="int4")


def test_codebook_and_conv_fallbacks_are_named_and_exact() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 4)
    ).eval()
    plan = Plan(
        layers={
            "0": Plan.uniform(["0"], bits=4).layers["0"],
            "3": Plan.uniform(["3"], bits=4, scheme="codebook").layers["3"],
            "4": Plan.uniform(["4"], bits=8).layers["4"],
        }
    )
    q = apply(net, plan)
    x = torch.randn(3, 3, 6, 6)
    proto, conv = lowbit_form(export_fp32(q, x), q)
    assert proto is not None
    assert conv.done["0.weight"] == "DequantizeLinear of int8 codes (4-bit)"
    assert conv.done["3.weight"].startswith("codebook 4-bit")
    assert conv.done["4.weight"] == "MatMul on int8 codes decoded at load (8-bit)"
    data = proto.SerializeToString()
    with torch.no_grad():
        want = q(x)
    got = OnnxModel(data)(x)
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL * max(1.0, float(want.abs().max())))
    inits = {i.name: i for i in proto.graph.initializer}
    assert not any(
        i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 16 * 4
        for i in inits.values()
        if len(i.dims) > 1
    )  # no fp32 weight matrix left


def test_unbaked_weight_is_kept_fp32_with_its_reason() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    q = apply(net, Plan.uniform(["0", "2"], bits=4))
    with torch.no_grad():
        q[2].weight.add_(1e-3)  # no longer code * scale
    proto, conv = lowbit_form(export_fp32(q, torch.randn(2, 32)), q)
    assert proto is not None and "0.weight" in conv.done
    assert conv.kept == {
        "2.weight": "its values are not code * scale of its record (is the model baked?)"
    }
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[LOWBIT_KEY])["2.weight"].startswith("fp32: its values")


def test_a_form_that_breaks_is_not_offered(monkeypatch, caplog) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    q = apply(net, Plan.uniform(["0", "2"], bits=4))
    x = torch.randn(4, 32)
    real = onnx_mod.lowbit_form

    def broken(proto, model):
        form, conv = real(proto, model)
        for init in form.graph.initializer:  # double every scale: a wrong form
            if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 1:
                a = onnx.numpy_helper.to_array(init) * 2
                init.CopyFrom(onnx.numpy_helper.from_array(a, init.name))
        return form, conv

    monkeypatch.setattr(onnx_mod, "lowbit_form", broken)
    with caplog.at_level(logging.WARNING, logger="autocompress.deploy"):
        forms = deploy_forms(q, x, int8=False)
    assert sorted(forms) == ["fp32"]
    assert "low-bit ONNX form not offered: its outputs differ from the fp32 form" in caplog.text


def test_records_of_a_compressed_model_are_untouched() -> None:
    model = _bert()
    q = apply(model, _plan(model, 4, 8))
    before = {k: (r.bits, r.scheme) for k, r in quant_records(q).items()}
    deploy_forms(q, zoo_inputs("bert", 2), int8=False)
    assert {k: (r.bits, r.scheme) for k, r in quant_records(q).items()} == before
