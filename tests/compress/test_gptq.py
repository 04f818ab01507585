"""GPTQ (``compress._gptq``): it beats round-to-nearest where it should, keeps masks and the
engine's grid, and is wired into ``compress.apply`` by ``Plan.calibration``."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

from autocompress import compress
from autocompress.artifacts import export, load
from autocompress.compress._gptq import calibrate, gptq_rows
from autocompress.compress._meta import quant_records
from autocompress.compress._prune import magnitude_mask
from autocompress.compress._quant import (
    attach,
    clipped_scale,
    qmax,
    scale_grid,
    set_sparsity,
    uniform_codes,
    uniform_scale,
)
from autocompress.errors import PlanError
from autocompress.spaces._plan import FinetuneSettings, LayerPlan, Plan
from autocompress.tasks import Task

NO_FT = FinetuneSettings(epochs=0)


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features (as real activations have): one fixed
    mixing matrix, ``seed`` draws the samples."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(123))
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix


def _rtn(w: torch.Tensor, bits: int, group: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    w = w if mask is None else w * mask
    s = uniform_scale(w, bits, 0, group)
    return uniform_codes(w, s, bits, 0, group) * scale_grid(s, w, 0, group)


@pytest.mark.parametrize("group", [0, 16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_gptq_lowers_the_layer_output_error(group: int, sparsity: float) -> None:
    """||(W - Q) X|| on held-out inputs of the same distribution: GPTQ below RTN."""
    x_cal, x_test = _correlated(1024, 64, 0), _correlated(1024, 64, 1)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    mask = magnitude_mask(w, sparsity) if sparsity else None
    q, scale = gptq_rows(w, x_cal.T @ x_cal, 3, group, mask)
    rtn = _rtn(w, 3, group, mask)

    def err(v: torch.Tensor) -> float:
        return float(((w - v) @ x_test.T).pow(2).mean())

    # dense: GPTQ's whole gain; pruned: the clamped per-channel range limits the compensation
    assert err(q) < (0.8 if not sparsity else 0.95) * err(rtn)
    grid = scale_grid(scale, w, 0, group)
    codes = q / grid
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= qmax(3)
    assert torch.equal(scale, scale.half().float())
    if mask is not None:
        assert bool((q[mask == 0] == 0).all())


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    return (x + x.roll(1, 2) + x.roll(1, 3)) / 3  # neighbouring pixels correlate


def _task(model: nn.Module, x: torch.Tensor) -> Task:
    n = len(x) // 3
    y = torch.zeros(len(x), dtype=torch.long)
    return Task.from_module(
        model,
        (x[:n], y[:n]),
        (x[n : 2 * n], y[n : 2 * n]),
        (x[2 * n :], y[2 * n :]),
    )


def test_apply_with_gptq_beats_rtn_on_conv_and_linear_and_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Conv().eval()
    task = _task(model, _smooth_images(900, 0))
    x = _smooth_images(900, 0)[600:]
    ref = model(x).detach()
    err = {}
    for cal in ("none", "gptq"):
        plan = Plan(
            layers={"conv": LayerPlan(bits=3), "fc": LayerPlan(bits=3, group=32, sparsity=0.5)},
            finetune=NO_FT,
            calibration=cal,
        )
        small = compress.apply(model, plan, task)
        err[cal] = float((small(x).detach() - ref).pow(2).mean())
        assert float((small.fc.weight == 0).float().mean()) >= 0.5
    assert err["gptq"] < 0.8 * err["none"]
    art = export(small, plan, tmp_path / "g")
    back = load(art.path, model=_Conv())
    for k, v in small.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert torch.equal(
        quant_records(back)["fc.weight"].scale, quant_records(small)["fc.weight"].scale
    )


def test_pruned_weights_stay_exactly_zero_and_masks_are_the_plans() -> None:
    torch.manual_seed(0)
    model = _Conv().eval()
    task = _task(model, _smooth_images(300, 1))
    plan = Plan(layers={"fc": LayerPlan(bits=4, sparsity=0.7)}, finetune=NO_FT)
    rtn = compress.apply(model, plan, task)
    gptq = compress.apply(model, plan.replace(calibration="gptq"), task)
    pruned = magnitude_mask(model.fc.weight, 0.7) == 0
    assert bool((rtn.fc.weight[pruned] == 0).all()) and bool((gptq.fc.weight[pruned] == 0).all())
    assert not torch.equal(rtn.fc.weight, gptq.fc.weight)


def test_gptq_then_finetune_keeps_gptqs_scales() -> None:
    """QAT after GPTQ starts from GPTQ's rounding with the same (group-wise) scales."""
    torch.manual_seed(0)
    model = _Conv().eval()
    task = _task(model, _smooth_images(300, 2))
    plan = Plan(layers={"fc": LayerPlan(bits=4, group=16)}, finetune=NO_FT, calibration="gptq")
    only = compress.apply(model, plan, task)
    tuned = compress.apply(model, plan.replace(finetune=FinetuneSettings(epochs=1)), task)
    a, b = quant_records(only)["fc.weight"], quant_records(tuned)["fc.weight"]
    assert b.group == 16 and torch.equal(a.scale, b.scale)
    assert not torch.equal(only.fc.weight, tuned.fc.weight)  # the fine-tune moved codes


def test_calibrate_is_sequential_and_skips_what_it_cannot_do() -> None:
    """Layers run in forward order; an embedding (no input activations) keeps RTN, on clipped
    scales."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(self.emb(ids))))

    torch.manual_seed(0)
    net = Net()
    plan = Plan.uniform(["emb", "a", "b"], bits=4, group=16)
    attach(net, plan)
    set_sparsity(net, 1.0)
    ids = torch.randint(0, 20, (64, 5))
    assert calibrate(net, [ids[:32], ids[32:]]) == 2
    ps = {n: m.parametrizations.weight[0] for n, m in net.named_children()}
    assert ps["a"].fixed is not None and ps["b"].fixed is not None
    emb = net.emb.parametrizations.weight
    assert torch.equal(ps["emb"].fixed, clipped_scale(emb.original.detach(), 4, 0, 16))


def test_clipped_static_scales_in_gptq() -> None:
    """``clip=True``: GPTQ's static scales are the clipped ones, codes stay in range."""
    x = _correlated(512, 64, 0)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    w[0, 5] = 20.0
    q, s = gptq_rows(w, x.T @ x, 3, 16, clip=True)
    assert torch.equal(s, clipped_scale(w, 3, 0, 16))
    codes = q / scale_grid(s, w, 0, 16)
    assert torch.equal(codes, codes.round()) and bool((codes.abs() <= qmax(3)).all())


def test_calibration_needs_a_task_and_a_valid_name() -> None:
    with pytest.raises(PlanError, match="calibration='gptq' needs calibration inputs"):
        compress.apply(
            nn.Sequential(nn.Linear(4, 4)), Plan.uniform(["0"], bits=4, calibration="gptq")
        )
    with pytest.raises(PlanError, match="calibration='awq' is unknown"):
        Plan(calibration="awq")


def test_gptq_on_hf_conv1d() -> None:
    pytest.importorskip("transformers")
    from autocompress._zoo import ZOO, zoo_inputs

    base = ZOO["gpt2"].build()
    inputs = zoo_inputs("gpt2", 48, seed=3)
    task = Task.from_hf(base, inputs, zoo_inputs("gpt2", 8, seed=4), zoo_inputs("gpt2", 8, seed=5))
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    plan = Plan.uniform(names, bits=3, group=32, finetune=NO_FT, calibration="gptq")
    small = compress.apply(base, plan, task)
    rec = quant_records(small)["transformer.h.0.mlp.c_fc.weight"]
    assert rec.axis == 1 and rec.group == 32
    with tempfile.TemporaryDirectory() as d:
        back = load(export(small, plan, d).path, model=ZOO["gpt2"].build())
        assert torch.equal(
            back.transformer.h[0].mlp.c_fc.weight, small.transformer.h[0].mlp.c_fc.weight
        )


def test_calibration_batches_are_recut_by_length() -> None:
    """Right-padded token batches: the same real tokens, less padding; others untouched."""
    from autocompress.compress._gptq import _by_length

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 17, (40,), generator=g)
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (40, 16), generator=g) * mask
    batches = [
        {"input_ids": ids[i : i + 16], "attention_mask": mask[i : i + 16]} for i in (0, 16, 32)
    ]
    out = _by_length(batches)
    assert sum(int(b["attention_mask"].sum()) for b in out) == int(mask.sum())
    assert sum(b["input_ids"].numel() for b in out) < ids.numel()
    real = sorted(
        tuple(r[m.bool()].tolist())
        for b in out
        for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)
    )
    assert real == sorted(tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True))
    plain = [torch.randn(4, 3)]
    assert _by_length(plain) is plain
