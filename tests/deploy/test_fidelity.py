"""Fidelity-aware deployment forms: ``int8="auto"`` never ships a form with int8 activations
unchecked.

On a tiny random BERT (``transformers`` config, 2 layers, 64 wide): the default (no calibration)
is an exact form; with calibration, a faster form that breaks the tolerance or the caller's
check is rejected and one that passes is shipped; ``MatMulNBits`` ``accuracy_level`` reaches the
graph; the per-token int8 form is close to the exact one; every form stays within 1.25x of the
artifact's bytes. Timings are replaced by fixed numbers where the choice depends on them, so no
assertion depends on this machine's speed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import autocompress.deploy._onnx as onnx_mod
from autocompress.artifacts import export
from autocompress.compress import apply
from autocompress.deploy import OnnxModel, deploy_forms, onnx_form, to_onnx
from autocompress.deploy._fidelity import Fidelity, is_exact, output_error
from autocompress.deploy._latency import LatencyStats
from autocompress.deploy._lowbit import lowbit_form
from autocompress.deploy._onnx import _copy, as_numpy
from autocompress.errors import AutocompressError
from autocompress.spaces import LayerPlan, Plan
from autocompress.spaces._discover import discover_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

SLACK = 1.25


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def _inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 512, (n, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _plan(model: nn.Module, linear: int, group: int = 0) -> Plan:
    names = [i.name for i in discover_layers(model)[0]]
    kw = {"group": group} if group else {}
    lp = {n: LayerPlan(bits=linear, **kw) for n in names if "embeddings" not in n}
    lp["embeddings.word_embeddings"] = LayerPlan(bits=4)
    return Plan(layers=lp)


@pytest.fixture(scope="module")
def compressed() -> tuple[nn.Module, Plan, dict[str, bytes]]:
    bert = _bert()
    plan = _plan(bert, 8)
    q = apply(bert, plan)
    forms = deploy_forms(q, _inputs(4, 0), output="last_hidden_state")
    return q, plan, forms


@pytest.fixture
def approx_faster(monkeypatch):
    """Fixed timings: int8 1 ms, int8_token 2 ms, lowbit_int8 3 ms, exact forms 10 ms."""
    ms = {"int8": 1.0, "int8_token": 2.0, "lowbit_int8": 3.0}

    def fake(candidates, inputs, **kw):
        return {k: LatencyStats(10.0 if is_exact(k) else ms[k], 0.0, 0.0, 1) for k in candidates}

    monkeypatch.setattr(onnx_mod, "measure_latency", fake)


def test_all_forms_built_and_tagged(compressed) -> None:
    _, _, forms = compressed
    assert set(forms) == {"fp32", "lowbit", "int8", "int8_token", "lowbit_int8"}
    for name, data in forms.items():
        assert OnnxModel(data).form == name


def test_default_auto_is_exact_even_when_int8_is_faster(compressed, approx_faster) -> None:
    q, _, _ = compressed
    data = onnx_form(q, _inputs(4, 0), output="last_hidden_state", batch_size=8)
    assert OnnxModel(data).form == "lowbit"


def test_calibration_rejects_a_form_over_tolerance(compressed, approx_faster) -> None:
    q, _, _ = compressed
    cal = [_inputs(8, 1), _inputs(8, 2)]
    data = onnx_form(q, _inputs(4, 0), output="last_hidden_state", calibration=cal, tolerance=0.0)
    assert OnnxModel(data).form == "lowbit"  # every int8-activation form moved the outputs


def test_calibration_check_decides(compressed, approx_faster) -> None:
    q, _, _ = compressed
    seen: list[str] = []

    def refuse(om: OnnxModel) -> bool:
        seen.append(om.form)
        return False

    kw = {"output": "last_hidden_state", "calibration": _inputs(8, 1)}
    assert OnnxModel(onnx_form(q, _inputs(4, 0), check=refuse, **kw)).form == "lowbit"
    assert seen == ["int8", "int8_token", "lowbit_int8"]  # all tried, fastest first
    shipped = OnnxModel(onnx_form(q, _inputs(4, 0), check=lambda om: True, **kw)).form
    assert shipped == "int8"  # the fastest (by the fixed timings) that passes


def test_generous_tolerance_ships_the_fastest_passing(compressed, approx_faster) -> None:
    q, _, forms = compressed
    fid = Fidelity([_inputs(8, 1)], tolerance=0.5)
    x = as_numpy(_inputs(8, 0))
    assert onnx_mod.choose_form(forms, x, fidelity=fid) == "int8"
    assert set(fid.verdicts) == {"int8"} and fid.verdicts["int8"][1]
    assert 0 < fid.verdicts["int8"][0] <= 0.5


def test_check_without_calibration_is_refused(compressed) -> None:
    q, _, _ = compressed
    with pytest.raises(AutocompressError, match="check needs calibration"):
        onnx_form(q, _inputs(4, 0), output="last_hidden_state", check=lambda om: True)
    with pytest.raises(AutocompressError, match="tolerance"):
        onnx_form(q, _inputs(4, 0), output="last_hidden_state", tolerance=-1)


def test_accuracy_level_reaches_matmulnbits(compressed) -> None:
    from autocompress.deploy import export_fp32

    bert = _bert()
    q = apply(bert, _plan(bert, 4, group=32))
    fp = export_fp32(q, _inputs(4, 0), output="last_hidden_state")

    def levels(proto: onnx.ModelProto) -> set[int]:
        out = set()
        for n in proto.graph.node:
            if n.op_type == "MatMulNBits":
                attrs = {a.name: a.i for a in n.attribute}
                out.add(attrs.get("accuracy_level", 0))
        return out

    exact, conv = lowbit_form(_copy(fp), q)
    fast, conv4 = lowbit_form(_copy(fp), q, accuracy_level=4)
    assert levels(exact) == {0} and levels(fast) == {4}
    assert all("accuracy_level 4" in v for v in conv4.done.values() if "MatMulNBits" in v)
    with pytest.raises(ValueError, match="accuracy_level"):
        lowbit_form(_copy(fp), q, accuracy_level=7)
    # the exact form reproduces torch; level 4 is close but not identical
    x = _inputs(6, 3)
    with torch.no_grad():
        want = q(**x).last_hidden_state.numpy()
    got0 = OnnxModel(exact.SerializeToString()).run_numpy(**as_numpy(x))[0]
    got4 = OnnxModel(fast.SerializeToString()).run_numpy(**as_numpy(x))[0]
    np.testing.assert_allclose(got0, want, atol=1e-4, rtol=1e-3)
    assert 0 < output_error([[want]], [[got4]]) < 1e-2
    # 8-bit weights run through MatMulNBits only when asked (nbits_max=8)
    q8 = apply(bert, _plan(bert, 8))
    fp8 = export_fp32(q8, _inputs(4, 0), output="last_hidden_state")
    assert levels(lowbit_form(_copy(fp8), q8)[0]) == set()
    n8, c8 = lowbit_form(_copy(fp8), q8, accuracy_level=4, nbits_max=8)
    assert levels(n8) == {4} and any("MatMulNBits 8-bit" in v for v in c8.done.values())


def test_token_form_is_closer_than_per_tensor_int8(compressed) -> None:
    q, _, forms = compressed
    x = [_inputs(8, 4)]
    ref = Fidelity(x)
    ref.set_reference(OnnxModel(forms["lowbit"]))
    tok = ref.error(OnnxModel(forms["int8_token"]))
    per_tensor = ref.error(OnnxModel(forms["int8"]))
    assert 0 < tok < per_tensor


def test_every_form_within_slack_of_the_artifact(compressed, tmp_path: Path) -> None:
    q, plan, forms = compressed
    size = export(q, plan, tmp_path / "a").size_bytes
    for name in ("lowbit", "lowbit_int8", "int8_token", "int8"):
        assert len(forms[name]) <= SLACK * size, name
    p = to_onnx(q, _inputs(4, 0), tmp_path / "m.onnx", output="last_hidden_state")
    assert p.stat().st_size <= SLACK * size


def test_named_forms_can_be_written(compressed) -> None:
    q, _, _ = compressed
    for name in ("lowbit_int8", "int8_token"):
        data = onnx_form(q, _inputs(4, 0), output="last_hidden_state", form=name)
        assert OnnxModel(data).form == name


@pytest.mark.parametrize(("bits", "group"), [(3, 32), (2, 0), (5, 16)])
def test_odd_bit_embedding_packed_densely(bits: int, group: int, tmp_path: Path) -> None:
    """2/3/5..7-bit embeddings are stored at their own bits (GatherBlockQuantized would hold
    them in 4- or 8-bit slots) and decoded at load: exact, and within 1.25x of the artifact."""
    import json

    bert = _bert()
    names = [i.name for i in discover_layers(bert)[0]]
    lp = {n: LayerPlan(bits=8) for n in names if "embeddings" not in n}
    lp["embeddings.word_embeddings"] = LayerPlan(bits=bits, **({"group": group} if group else {}))
    plan = Plan(layers=lp)
    q = apply(bert, plan)
    data = deploy_forms(q, _inputs(4, 0), int8=False, output="last_hidden_state")["lowbit"]
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    how = json.loads(meta["autocompress.lowbit"])["embeddings.word_embeddings.weight"]
    assert how.startswith(f"Gather of a table decoded at load from {bits}-bit packed codes")
    x = _inputs(6, 2)
    with torch.no_grad():
        want = q(**x).last_hidden_state.numpy()
    got = OnnxModel(data).run_numpy(**as_numpy(x))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    assert len(data) <= SLACK * export(q, plan, tmp_path / "a").size_bytes


def test_a_check_that_is_not_a_function_is_refused_up_front() -> None:
    """Refused when the settings are made (before forms are built and timed), with or
    without a tolerance."""
    batch = [torch.randn(2, 4)]
    for tol in (None, 1e-3):
        with pytest.raises(AutocompressError, match="check must be a function") as e:
            Fidelity(batch, tolerance=tol, check=0.99)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
