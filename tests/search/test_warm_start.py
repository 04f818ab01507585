"""Warm-start plans from the sensitivity pass: in the space (strict), ordered by byte budget,
and the hand-style plans (Linear 8-bit + embedding 4-bit, ...) among them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.objectives import Objective
from autocompress.search._searcher import baseline_params
from autocompress.spaces import CompressionSpace, Knobs, hand_plans, sensitivity, sensitivity_plans
from autocompress.tasks import Task


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).mean(dim=1)
        for b in self.blocks:
            h = h + torch.relu(b(h))
        return self.head(h)


@pytest.fixture(scope="module")
def task() -> Task:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (64, 6), generator=g), torch.randint(0, 4, (64,), generator=g)
    return Task.from_module(Toy().eval(), (x, y), (x, y), (x, y))


SPACES = {
    "plain": dict(knobs=Knobs(bits=(2, 3, 4, 6, 8, 32), sparsity=None)),
    "no fp32, sparse floor": dict(knobs=Knobs(bits=(3, 4, 8), sparsity=(0.1, 0.5))),
    "grouped by role": dict(knobs=Knobs(bits=(3, 4, 6, 8), sparsity=None), group_by="role"),
    "pinned and excluded": dict(
        knobs=Knobs(bits=(4, 8, 16), sparsity=None), exclude=["head"], pin={"emb": {"bits": 8}}
    ),
}


@pytest.mark.parametrize("name", list(SPACES))
def test_plans_lie_in_the_space_and_are_ordered_by_budget(task: Task, name: str) -> None:
    space = CompressionSpace.from_model(task.teacher(), **SPACES[name])
    sens = sensitivity(task, space, examples=32)
    plans = sensitivity_plans(task, space, Objective.default(), n=4, sens=sens, hand=False)
    assert 1 <= len(plans) <= 4
    baseline_params(space, plans, strict=True)  # raises if a plan is outside the space
    sizes = [sens.estimate(p) for p in plans]
    assert None not in sizes and sizes == sorted(sizes, reverse=True)
    assert len(set(sizes)) == len(sizes)
    everything = sensitivity_plans(task, space, Objective.default(), n=4, sens=sens)
    assert everything[: len(plans)] == plans  # greedy first, then the hand-style plans
    assert len(baseline_params(space, everything, strict=True)) == len(everything)


def test_hand_plans_give_embeddings_their_own_bits(task: Task) -> None:
    space = CompressionSpace.from_model(task.teacher(), Knobs(bits=(4, 6, 8), sparsity=None))
    plans = hand_plans(space)
    got = [(p.layers["blocks.0"].bits, p.layers["head"].bits, p.layers["emb"].bits) for p in plans]
    assert got == [(8, 8, 8), (8, 8, 4), (6, 6, 8), (6, 6, 4)]
    baseline_params(space, plans, strict=True)


def test_a_tighter_drop_keeps_plans_larger(task: Task) -> None:
    space = CompressionSpace.from_model(task.teacher(), Knobs(bits=(2, 3, 4, 8), sparsity=None))
    sens = sensitivity(task, space, examples=32)
    loose = sensitivity_plans(task, space, 0.5, n=3, sens=sens, hand=False)
    tight = sensitivity_plans(task, space, 1e-9, n=3, sens=sens, hand=False)
    assert sens.estimate(tight[-1]) >= sens.estimate(loose[-1])
