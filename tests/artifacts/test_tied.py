"""Tied tensors are stored once and tied again on load; format-1 artifacts still load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_export_load import KNOBS, MLP, _edit_layout, assert_same_model, make_model, plan_of
from torch import nn

from autocompress.artifacts import export, inspect_artifact, load
from autocompress.compress._meta import QuantRecord, fp16_exact, quant_records, set_quant_records
from autocompress.errors import ArtifactError
from autocompress.spaces._plan import LayerPlan, Plan

FORMAT1 = Path(__file__).parent / "data" / "format1-mlp"


class TiedPair(nn.Module):
    """Two Linear layers sharing one weight (tied only if ``tie``)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8, bias=False)
        if tie:
            self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_tied_pair_is_stored_once_and_tied_on_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = TiedPair(), torch.randn(3, 8)
    art = export(model, Plan(), tmp_path / "a")
    info = inspect_artifact(art.path)
    assert info["aliases"] == {"b.weight": "a.weight"}
    assert [t["name"] for t in info["tensors"]] == ["a.weight", "a.bias"]
    loaded = load(art.path, model=TiedPair(tie=False))  # an untied architecture: tied again
    assert loaded.b.weight is loaded.a.weight
    assert len(list(loaded.parameters())) == 2
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    untied = export(TiedPair(tie=False), Plan(), tmp_path / "b")
    assert art.size_bytes < untied.size_bytes - 200  # the 8x8 fp32 weight is not stored twice


def test_tied_quantized_weight_keeps_its_record(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedPair()
    w = model.a.weight.detach()
    scale = fp16_exact(w.abs().amax(dim=1) / 7)
    with torch.no_grad():
        model.a.weight.copy_(torch.clamp(torch.round(w / scale[:, None]), -7, 7) * scale[:, None])
        model.a.bias.copy_(fp16_exact(model.a.bias))
    set_quant_records(model, {"b.weight": QuantRecord(4, "uniform", scale=scale)})
    plan = Plan(layers={"b": LayerPlan(bits=4)})
    art = export(model, plan, tmp_path / "a")
    kinds = {t["name"]: t["kind"] for t in inspect_artifact(art.path)["tensors"]}
    assert kinds == {"a.weight": "u4", "a.bias": "f16"}  # coded with the alias's record
    loaded = load(art.path, model=TiedPair())
    recs = quant_records(loaded)
    assert set(recs) == {"a.weight", "b.weight"} and torch.equal(recs["b.weight"].scale, scale)
    assert torch.equal(loaded.a.weight, model.a.weight) and loaded.b.weight is loaded.a.weight


def test_bad_alias_is_refused(tmp_path: Path) -> None:
    art = export(TiedPair(), Plan(), tmp_path / "a")
    _edit_layout(art.path, "b.weight = a.weight", "b.weight = nope.weight")
    with pytest.raises(ArtifactError, match="alias 'b.weight' must name an earlier stored"):
        load(art.path, model=TiedPair())


def test_gpt2_teacher_artifact_stores_the_tied_embedding_once(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    art = export(model, Plan(), tmp_path / "gpt2")
    fp32 = 4 * sum(p.numel() for p in model.parameters())  # tied counted once
    print(f"\ntiny GPT-2: artifact {art.size_bytes} B for {fp32} B of fp32 parameters")
    assert art.size_bytes <= 1.01 * fp32
    assert inspect_artifact(art.path)["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load(art.path, model=transformers.GPT2LMHeadModel(cfg))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_format1_artifact_still_loads(tmp_path: Path) -> None:
    """``data/format1-mlp`` was written by the format-1 exporter (deflate, no planes/zstd)."""
    meta = json.loads((FORMAT1 / "weights.safetensors").read_bytes()[8:].split(b"}}")[0] + b"}}")
    assert meta["__metadata__"]["format"] == "autocompress-weights/1"
    torch.manual_seed(0)
    model = make_model()
    loaded = load(FORMAT1, model=MLP(bn=True))
    assert_same_model(model, loaded, torch.randn(4, 12))
    again = export(loaded, plan_of(KNOBS), tmp_path / "v2")
    assert_same_model(model, load(again.path, model=MLP(bn=True)), torch.randn(4, 12))


def test_format1_refuses_format2_features(tmp_path: Path) -> None:
    shutil.copytree(FORMAT1, tmp_path / "a")
    _edit_layout(tmp_path / "a", "bn.weight 20 f16 d z 7", "bn.weight 20 f16 p z 7")
    with pytest.raises(ArtifactError, match="unknown encoding 'p'"):
        load(tmp_path / "a", model=MLP(bn=True))


def test_t5_shared_embedding_aliases(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        d_model=32,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        vocab_size=100,
        d_kv=16,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    art = export(model, Plan(), tmp_path / "t5")
    assert art.size_bytes <= 1.01 * 4 * sum(p.numel() for p in model.parameters())
    aliases = inspect_artifact(art.path)["aliases"]
    assert aliases == {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
        "lm_head.weight": "shared.weight",
    }
    loaded = load(art.path, model=transformers.T5ForConditionalGeneration(cfg))
    assert all(loaded.get_parameter(a) is loaded.shared.weight for a in aliases)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = loaded(input_ids=ids, decoder_input_ids=ids).logits
        assert torch.equal(out, model(input_ids=ids, decoder_input_ids=ids).logits)
