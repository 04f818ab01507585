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


# --- the fine-tune loop --------------------------------------------------------------------
GPU = pytest.mark.gpu
NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[GPU, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason=NO_GPU)])],
)  # fmt: skip
def test_apply_and_finetune_on_device(digits_mlp: Task, device: str) -> None:
    """The same code path on every device: sparsity + bits + 2-epoch distillation (AMP on CUDA)."""
    plan = Plan.uniform(LAYERS, sparsity=0.7, bits=6, finetune=FinetuneSettings(epochs=2))
    q = apply(digits_mlp.teacher(), plan, digits_mlp, device=device)
    assert next(q.parameters()).device.type == "cpu"
    assert digits_mlp.evaluate(q, "val")["accuracy"] > 0.8
    w = q.fc1.weight
    assert int((w == 0).sum()) == round(0.7 * w.numel())


def _student_and_task(digits_mlp: Task) -> tuple[nn.Module, Task]:
    plan = Plan.uniform(LAYERS, bits=8, finetune=NO_FT)
    student = apply(digits_mlp.teacher(), plan)
    attach(student, plan)
    return student, digits_mlp


def test_step_budget_and_accumulation(digits_mlp: Task) -> None:
    from autocompress.compress import distill

    student, task = _student_and_task(digits_mlp)
    n = len(task.data("train"))
    s = FinetuneSettings(epochs=5, batch_size=64, max_steps=3)
    r = distill(student, task.teacher(), task, s)
    assert r["steps"] == 3 and r["epochs"] == 1
    per_epoch = -(-n // 64)  # ceil: the last partial accumulation still steps
    acc = FinetuneSettings(epochs=1, batch_size=64, accum_steps=4)
    r = distill(student, task.teacher(), task, acc)
    assert r["steps"] == -(-per_epoch // 4)


def test_time_budget_stops_after_one_step(digits_mlp: Task) -> None:
    from autocompress.compress import distill

    student, task = _student_and_task(digits_mlp)
    r = distill(student, task.teacher(), task, FinetuneSettings(epochs=50, max_seconds=1e-9))
    assert r["steps"] == 1 and r["epochs"] == 1


def test_streamed_data_distills_with_teacher_outputs_per_batch(digits_mlp: Task) -> None:
    """A DataLoader task fine-tunes (teacher run per batch) and improves a damaged student."""
    from torch.utils.data import DataLoader

    from autocompress.compress import distill

    x, y = digits_mlp.data("train").tensors
    loader = DataLoader(digits_mlp.data("train"), batch_size=32, shuffle=True)
    task = Task.from_module(
        digits_mlp.teacher(), loader, digits_mlp.data("val"), digits_mlp.data("test")
    )
    student = copy.deepcopy(digits_mlp.teacher())
    student.fc3.reset_parameters()  # a damaged student: chance-level accuracy
    before = task.evaluate(student, "val")["accuracy"]
    r = distill(student, task.teacher(), task, FinetuneSettings(epochs=2, lr=1e-3))
    assert r["steps"] == 2 * -(-len(x) // 32)
    assert task.evaluate(student, "val")["accuracy"] > before + 0.3


def test_diverged_loss_is_reported(digits_mlp: Task) -> None:
    from autocompress.compress import FinetuneDiverged, distill

    student, task = _student_and_task(digits_mlp)
    with torch.no_grad():
        student.fc3.bias.fill_(float("nan"))
    with pytest.raises(FinetuneDiverged, match="loss became nan"):
        distill(student, task.teacher(), task, FinetuneSettings(epochs=2))


def test_best_weights_are_kept_in_one_buffer() -> None:
    from autocompress.tasks._train import Snapshot

    m, snap = DigitsMLP(), Snapshot()
    snap.save(m)
    buf = snap.state["fc1.weight"]
    with torch.no_grad():
        m.fc1.weight.add_(1.0)
    snap.save(m)
    assert snap.state["fc1.weight"] is buf and torch.equal(buf, m.fc1.weight)
    with torch.no_grad():
        m.fc1.weight.zero_()
    snap.restore(m)
    assert torch.equal(m.fc1.weight, buf)


def test_old_plan_json_without_new_finetune_keys_loads() -> None:
    old = '{"_type":"Plan","_version":1,"finetune":{"epochs":3,"ramp":0.0},"layers":{}}'
    ft = Plan.from_json(old).finetune
    assert (ft.epochs, ft.accum_steps, ft.max_steps, ft.max_seconds, ft.amp) == (3, 1, 0, 0.0, True)
    with pytest.raises(PlanError, match="accum_steps=0"):
        FinetuneSettings(accum_steps=0)
    with pytest.raises(PlanError, match="max_seconds"):
        FinetuneSettings(max_seconds=-1.0)


def test_cached_teacher_outputs_are_used_as_given(digits_mlp: Task) -> None:
    teacher = digits_mlp.teacher()
    plan = Plan.uniform(LAYERS, sparsity=0.5, bits=8, finetune=FinetuneSettings(epochs=1))
    a = apply(teacher, plan, digits_mlp)
    soft = digits_mlp.predict(teacher, "train")
    b = apply(teacher, plan, digits_mlp, teacher_outputs=soft)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    c = apply(teacher, plan, digits_mlp, teacher_outputs=torch.zeros_like(soft))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_autocast_branch_runs(digits_mlp: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mixed-precision branch (CUDA's) exercised with CPU bf16 autocast: losses in fp32,
    the fake-quantized student still trains and bakes to its grid."""
    from autocompress.compress import _finetune

    monkeypatch.setattr(_finetune, "_amp", lambda device, enabled: torch.bfloat16)
    plan = Plan.uniform(LAYERS, sparsity=0.5, bits=8, finetune=FinetuneSettings(epochs=2))
    q = apply(digits_mlp.teacher(), plan, digits_mlp)
    assert q.fc1.weight.dtype == torch.float32
    assert digits_mlp.evaluate(q, "val")["accuracy"] > 0.8
