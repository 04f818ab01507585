"""Group-wise uniform scales (``QuantRecord.group``): engine -> export -> load, bit-exact."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autocompress import compress
from autocompress.artifacts import export, load
from autocompress.artifacts._kinds import aux_len, kind_bits, uniform_layout
from autocompress.compress._meta import QuantRecord, quant_records, set_quant_records
from autocompress.compress._quant import as_rows, qmax
from autocompress.errors import ArtifactError
from autocompress.spaces._plan import LayerPlan, Plan


class Net(nn.Module):
    """An embedding, a convolution and a Linear, with input dims that are not multiples of
    the groups (partial last groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 40)
        self.conv = nn.Conv2d(3, 6, 3)  # n_in = 27
        self.fc = nn.Linear(40, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).mean(1)
        img = h[:, :27].reshape(-1, 3, 3, 3)
        return self.fc(h) + self.conv(img).flatten(1)[:, :5]


def _check_grid(w: torch.Tensor, rec: QuantRecord) -> None:
    """The weight is ``q * scale[c, j // group]`` with |q| <= qmax: the contract of _meta."""
    rows = as_rows(w, rec.axis)
    n_in = rows.shape[1]
    assert tuple(rec.scale.shape) == (rows.shape[0], math.ceil(n_in / rec.group))
    assert torch.equal(rec.scale.half().float(), rec.scale)
    per = rec.scale.repeat_interleave(rec.group, dim=1)[:, :n_in]
    q = rows / per
    assert torch.equal(q, q.round()) and q.abs().max() <= qmax(rec.bits)


def test_group_scales_round_trip_linear_conv_embedding(tmp_path) -> None:
    torch.manual_seed(0)
    base = Net()
    plan = Plan(
        layers={
            "emb": LayerPlan(bits=4, group=32),
            "conv": LayerPlan(bits=4, group=16, sparsity=0.5),
            "fc": LayerPlan(bits=3, group=16),
        }
    )
    model = compress.apply(base, plan)
    recs = quant_records(model)
    for name in ("emb.weight", "conv.weight", "fc.weight"):
        _check_grid(model.state_dict()[name], recs[name])
    assert recs["emb.weight"].group == 32 and tuple(recs["emb.weight"].scale.shape) == (30, 2)
    assert float((model.conv.weight == 0).float().mean()) >= 0.5
    art = export(model, plan, tmp_path / "a")
    back = load(art.path, model=Net())
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    for k, r in recs.items():
        b = quant_records(back)[k]
        assert (b.bits, b.group, b.axis) == (r.bits, r.group, r.axis)
        assert torch.equal(b.scale, r.scale)
    ids = torch.randint(0, 30, (4, 7))
    assert torch.equal(model(ids), back(ids))


def test_group_scales_are_finer_than_per_channel() -> None:
    """Smaller groups follow the weights more closely: less rounding error at 4 bits."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 32))
    with torch.no_grad():
        base[0].weight.mul_(torch.rand(1, 256) * 4)  # column magnitudes vary, as in transformers
    err = {}
    for g in (0, 128, 32):
        q = compress.apply(base, Plan.uniform(["0"], bits=4, group=g))
        err[g] = float((q[0].weight - base[0].weight).detach().pow(2).sum())
    assert err[32] < err[128] < err[0]


def test_hf_conv1d_group_scales_round_trip(tmp_path) -> None:
    pytest.importorskip("transformers")
    from autocompress._zoo import ZOO, zoo_inputs

    base = ZOO["gpt2"].build()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.wte"]
    plan = Plan.uniform(names, bits=4, group=32)
    model = compress.apply(base, plan)
    rec = quant_records(model)["transformer.h.0.attn.c_attn.weight"]
    w = model.transformer.h[0].attn.c_attn.weight  # (in 64, out 192): channels on dim 1
    assert rec.axis == 1 and tuple(rec.scale.shape) == (192, 2)
    _check_grid(w, rec)
    assert quant_records(model)["lm_head.weight"] is quant_records(model)["transformer.wte.weight"]
    art = export(model, plan, tmp_path / "g")
    back = load(art.path, model=ZOO["gpt2"].build())
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = zoo_inputs("gpt2", 2)
    assert torch.equal(model(**x).logits, back(**x).logits)


def test_group_kinds_and_aux_bytes() -> None:
    assert uniform_layout("u4.1g32") == (1, 32) and uniform_layout("u4g128") == (0, 128)
    assert kind_bits("u4g32") == 4 and kind_bits("u4g48") is None and kind_bits("c4g32") is None
    assert aux_len("u4g32", (10, 70)) == 2 * 10 * 3  # 70 = 2 full groups + a partial one
    assert aux_len("u4.1g16", (40, 6)) == 2 * 6 * 3
    assert aux_len("u4", (10, 70)) == 20


def test_size_counts_the_group_scales(tmp_path) -> None:
    """Smaller groups store more scales, and ``size_bytes`` sees them."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(512, 64))
    sizes = {}
    for g in (0, 128, 16):
        plan = Plan.uniform(["0"], bits=4, group=g)
        sizes[g] = export(compress.apply(base, plan), plan, tmp_path / str(g)).size_bytes
    assert sizes[0] < sizes[128] < sizes[16]
    assert sizes[16] - sizes[0] >= 2 * 64 * (512 // 16 - 1) // 2  # the fp16 scales (zstd)


def test_bad_group_records_are_refused(tmp_path) -> None:
    net = nn.Linear(32, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.ones(2, 32))
    set_quant_records(net, {"weight": QuantRecord(4, "uniform", torch.ones(2, 1), group=24)})
    with pytest.raises(ArtifactError, match="group=24"):
        export(net, Plan(), tmp_path / "a")
    set_quant_records(net, {"weight": QuantRecord(4, "uniform", torch.ones(2, 1), group=16)})
    with pytest.raises(ArtifactError, match="scales for"):
        export(net, Plan(), tmp_path / "b")


def test_records_without_group_still_mean_per_channel(tmp_path) -> None:
    """A record built the old way (no ``group``) is per-channel and exports as ``u{b}``."""
    net = nn.Linear(6, 4, bias=False)
    scale = torch.tensor([0.5, 0.25, 1.0, 2.0])
    with torch.no_grad():
        net.weight.copy_(torch.randint(-7, 8, (4, 6)).float() * scale[:, None])
    set_quant_records(net, {"weight": QuantRecord(bits=4, scheme="uniform", scale=scale)})
    art = export(net, Plan(), tmp_path / "a")
    back = load(art.path, model=nn.Linear(6, 4, bias=False))
    rec = quant_records(back)["weight"]
    assert rec.group == 0 and torch.equal(rec.scale, scale)
    assert torch.equal(back.weight, net.weight)
