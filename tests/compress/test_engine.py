from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress import FinetuneSettings, LayerPlan, Plan, PlanError, Task
from autocompress.compress import apply, attach, bake, magnitude_mask, prune, quant_records
from autocompress.compress._prune import plan_masks
from autocompress.compress._quant import qmax
from autocompress.tasks._models import DigitsMLP

NO_FT = FinetuneSettings(epochs=0)
LAYERS = ["fc1", "fc2", "fc3"]


def test_magnitude_mask_exact_sparsity() -> None:
    w = torch.randn(100, 50)
    for s in (0.0, 0.3, 0.9, 0.99):
        mask = magnitude_mask(w, s)
        assert int((mask == 0).sum()) == round(s * w.numel())
        if s > 0:  # the kept entries are the largest ones
            assert w[mask == 0].abs().max() <= w[mask == 1].abs().min()


def test_prune_does_not_mutate_input() -> None:
    m = DigitsMLP()
    before = copy.deepcopy(m.state_dict())
    out = prune(m, Plan.uniform(LAYERS, sparsity=0.7))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert abs(float((out.fc2.weight == 0).float().mean()) - 0.7) < 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_quant_bakes_to_grid(bits: int) -> None:
    m = DigitsMLP()
    plan = Plan.uniform(LAYERS, sparsity=0.5, bits=bits, finetune=NO_FT)
    q = apply(m, plan)
    rec = quant_records(q)["fc2.weight"]
    assert rec.bits == bits and rec.scheme == "uniform"
    codes = q.fc2.weight / rec.scale[:, None]
    assert torch.equal(codes, codes.round())
    assert codes.abs().max() <= qmax(bits)
    assert torch.equal(rec.scale, rec.scale.half().float())  # fp16-exact scales
    assert torch.equal(q.fc2.bias, q.fc2.bias.half().float())
    assert float((q.fc2.weight == 0).float().mean()) >= 0.5  # mask kept


def test_codebook_quant_has_2_pow_bits_values_and_zero() -> None:
    q = apply(
        DigitsMLP(), Plan.uniform(LAYERS, sparsity=0.6, bits=3, scheme="codebook", finetune=NO_FT)
    )
    rec = quant_records(q)["fc1.weight"]
    assert rec.scheme == "codebook" and len(rec.codebook) == 8 and rec.codebook[0] == 0
    assert set(torch.unique(q.fc1.weight).tolist()) <= set(rec.codebook.tolist())


def test_masks_survive_finetune(digits_mlp: Task) -> None:
    """Gradual pruning reaches the exact planned sparsity and fine-tune never revives a zero."""
    plan = Plan.uniform(LAYERS, sparsity=0.8, bits=32, finetune=FinetuneSettings(epochs=6))
    q = apply(digits_mlp.teacher(), plan, digits_mlp)
    for name in LAYERS:
        w = q.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.8 * w.numel())


def test_one_shot_masks_are_kept() -> None:
    m = DigitsMLP()
    plan = Plan.uniform(LAYERS, sparsity=0.6, bits=8)
    masks = plan_masks(m, plan)
    attach(m, plan, masks)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # a training step would move every weight
    bake(m)
    for name in LAYERS:
        assert torch.all(m.get_submodule(name).weight[masks[name] == 0] == 0)


def test_attach_bake_roundtrip_is_stable() -> None:
    m = DigitsMLP()
    plan = Plan.uniform(LAYERS, sparsity=0.5, bits=4)
    attach(m, plan, plan_masks(m, plan))
    with torch.no_grad():
        fake = m(torch.randn(3, 64))
    out = bake(m)(torch.randn(3, 64))
    assert fake.shape == out.shape
    assert not any(n.endswith("original") for n, _ in m.named_parameters())


def test_apply_with_distillation_keeps_accuracy(digits_mlp: Task) -> None:
    """Uniform sparsity 0.8 + 6 bits with distillation stays within 1 point of the teacher."""
    teacher = digits_mlp.teacher()
    base = digits_mlp.evaluate(teacher, "test")["accuracy"]
    q = apply(teacher, Plan.uniform(LAYERS, sparsity=0.8, bits=6), digits_mlp)
    assert digits_mlp.evaluate(q, "test")["accuracy"] >= base - 0.01


def test_apply_composes_all_steps(digits_mlp: Task) -> None:
    plan = Plan(
        {
            "fc1": LayerPlan(sparsity=0.5, bits=4, rank_ratio=0.5),
            "fc2": LayerPlan(sparsity=0.3, bits=8, scheme="codebook"),
            "fc3": LayerPlan(bits=16),
        },
        width=0.5,
        finetune=FinetuneSettings(epochs=2),
    )
    q = apply(digits_mlp.teacher(), plan, digits_mlp)
    assert isinstance(q.fc1, nn.Sequential)
    assert set(quant_records(q)) == {"fc1.0.weight", "fc1.1.weight", "fc2.weight", "fc3.weight"}
    assert q.fc2.weight.shape == (50, 150)
    assert digits_mlp.evaluate(q, "val")["accuracy"] > 0.5


def test_apply_refuses_bad_plans_before_training(digits_mlp: Task) -> None:
    with pytest.raises(PlanError, match="unknown layer 'fc4'"):
        apply(digits_mlp.teacher(), Plan.uniform(["fc4"], bits=4), digits_mlp)
    with pytest.raises(PlanError, match="did you mean"):
        apply(digits_mlp.teacher(), Plan.uniform(["fc_1"], bits=4), digits_mlp)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(digits_mlp: Task) -> None:
    with pytest.raises(PlanError, match="no GPU"):
        apply(digits_mlp.teacher(), Plan.uniform(LAYERS, bits=8), digits_mlp, device="cuda")
