"""Engine + artifacts together: every built-in task, and a model the project never defined."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from autocompress import (
    CompressionSpace,
    FinetuneSettings,
    LayerPlan,
    Plan,
    PlanError,
    Task,
    compress,
    export,
    get_task,
    load,
)

SHORT = FinetuneSettings(epochs=1)


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "mnist1d-cnn", "mnist1d-transformer"])
def test_every_builtin_task_round_trips(name: str, tmp_path: Path) -> None:
    task = get_task(name)
    teacher = task.teacher()
    space = CompressionSpace.from_model(teacher, finetune=SHORT)
    layers = {}
    for i, info in enumerate(space.layers):
        layers[info.name] = LayerPlan(
            sparsity=(0.5, 0.8, 0.0)[i % 3],
            bits=(4, 8, 16, 32, 3)[i % 5],
            scheme="codebook" if i % 4 == 1 else "uniform",
            rank_ratio=0.5 if info.factorizable and i % 2 == 0 else 1.0,
        )
    plan = space.validate(Plan(layers, width=0.5, finetune=SHORT))
    model = compress.apply(teacher, plan, task)
    art = export(model, plan, tmp_path / name, task_spec=task.spec)
    again = load(art.path)  # rebuilt from the task spec alone
    x = task.data("test").tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert task.evaluate(again, "test") == task.evaluate(model, "test")


def test_width_half_really_shrinks_digits_mlp(digits_mlp: Task) -> None:
    teacher = digits_mlp.teacher()
    small = compress.apply(
        teacher, Plan(width=0.5, finetune=FinetuneSettings(epochs=0)), digits_mlp
    )
    assert small.fc1.weight.shape == (150, 64)
    assert small.fc2.weight.shape == (50, 150)
    assert small.fc3.weight.shape == (10, 50)
    hidden = teacher.fc2.weight.numel() / small.fc2.weight.numel()
    assert 3.9 < hidden < 4.1


class _UserBlock(nn.Module):
    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 3, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 48), nn.GELU(), nn.Linear(48, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(x)


class UserModel(nn.Module):
    """A model autocompress never saw: token embedding + transformer block + head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.block = _UserBlock()
        self.head = nn.Linear(24, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens)).mean(dim=1))


def test_user_model_discovered_compressed_exported_reloaded(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (120, 7), generator=g)
    y = (x[:, 0] % 3).long()
    model = UserModel()
    task = Task.from_module(model, (x[:80], y[:80]), (x[80:100], y[80:100]), (x[100:], y[100:]))
    space = CompressionSpace.from_model(model, finetune=SHORT)
    assert {"embed", "block.attn.out_proj", "block.mlp.0", "block.mlp.2", "head"} <= set(
        space.layer_names
    )
    plan = space.validate(
        Plan(
            {
                "embed": LayerPlan(sparsity=0.5, bits=4, rank_ratio=0.5),
                "block.attn.out_proj": LayerPlan(sparsity=0.3, bits=8),
                "block.mlp.0": LayerPlan(bits=4, scheme="codebook"),
                "block.mlp.2": LayerPlan(sparsity=0.6, bits=6, rank_ratio=0.5),
            },
            width=0.5,
            finetune=SHORT,
        )
    )
    small = compress.apply(model, plan, task)
    assert small.block.mlp[0].out_features == 24  # hidden 48 -> 24
    art = export(small, plan, tmp_path / "user")
    again = load(art.path, model=UserModel(), example_input=x[:2])
    with torch.no_grad():
        assert torch.equal(small(x), again(x))


def test_bad_plans_fail_before_training(digits_mlp: Task) -> None:
    t = get_task("mnist1d-transformer")
    with pytest.raises(PlanError, match="cannot be factorized"):
        compress.apply(
            t.build_model(), Plan({"blocks.0.attn.out_proj": LayerPlan(rank_ratio=0.5)}), t
        )
    with pytest.raises(PlanError, match="unknown layer"):
        compress.apply(digits_mlp.teacher(), Plan({"fc7": LayerPlan(bits=4)}), digits_mlp)


class _DictModel(nn.Module):
    """Keyword inputs with a padding mask, a dict output: the shape of a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = self.embed(input_ids) * attention_mask[..., None]
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1)
        return {"logits": self.head(torch.relu(self.fc(pooled))), "pooled": pooled}


def test_dict_batches_from_a_dataloader_round_trip(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from autocompress.tasks import DictDataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (96, 9), generator=g)
    mask = (torch.arange(9)[None] < torch.randint(2, 10, (96, 1), generator=g)).long()
    rows = {"input_ids": ids * mask, "attention_mask": mask, "labels": ids[:, 0] % 3}
    train = DataLoader(DictDataset(rows), batch_size=16, shuffle=True)
    model = _DictModel().eval()
    task = Task.from_module(model, train, rows, rows, eval_batch_size=32)
    plan = Plan(
        {
            "embed": LayerPlan(sparsity=0.5, bits=4),
            "fc": LayerPlan(bits=8, rank_ratio=0.5),
            "head": LayerPlan(bits=8),
        },
        finetune=SHORT,
    )
    small = compress.apply(model, plan, task)
    art = export(small, plan, tmp_path / "dict")
    again = load(art.path, model=_DictModel(), example_input=task.example_input())
    x = task.example_input(32)
    with torch.no_grad():
        assert torch.equal(small(**x)["logits"], again(**x)["logits"])
    assert task.evaluate(again, "test") == task.evaluate(small, "test")
