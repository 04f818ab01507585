"""Warm-start plans from the sensitivity pass: in the space (strict), ordered by byte budget,
and the hand-style plans (Linear 8-bit + embedding 4-bit, ...) among them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from raykit import private_ray
from torch import nn

from autocompress.objectives import Objective
from autocompress.search._searcher import baseline_params
from autocompress.spaces import (
    CompressionSpace,
    Knobs,
    Plan,
    hand_plans,
    sensitivity,
    sensitivity_plans,
)
from autocompress.tasks import Task

HERE = Path(__file__).resolve().parent


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
    # then the small plans (Linear 4-bit + embedding 4/3/2-bit): 3 and 2 bits project onto
    # the space's nearest width, 4, so the three collapse into one
    assert got == [(8, 8, 8), (8, 8, 4), (6, 6, 8), (6, 6, 4), (4, 4, 4)]
    baseline_params(space, plans, strict=True)


def test_a_tighter_drop_keeps_plans_larger(task: Task) -> None:
    space = CompressionSpace.from_model(task.teacher(), Knobs(bits=(2, 3, 4, 8), sparsity=None))
    sens = sensitivity(task, space, examples=32)
    loose = sensitivity_plans(task, space, 0.5, n=3, sens=sens, hand=False)
    tight = sensitivity_plans(task, space, 1e-9, n=3, sens=sens, hand=False)
    assert sens.estimate(tight[-1]) >= sens.estimate(loose[-1])


def test_search_run_opens_with_sensitivity_plans_and_caches_the_teacher(
    digits_mlp: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``search.run(sensitivity=True)``: the pass is cached in ``run_dir/sensitivity``, its plans
    are the first trials, the settings say so, its progress is a line per unit; a second run
    reuses the cached teacher artifact."""
    from autocompress.search import run
    from autocompress.spaces import FinetuneSettings

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))  # teachers reuse data
    cache_root = tmp_path / "cache" / "teachers" / "artifacts"
    space = CompressionSpace.from_model(
        digits_mlp.teacher(),
        Knobs(bits=(4, 8), sparsity=None),
        finetune=FinetuneSettings(epochs=0),
    )
    first = sensitivity_plans(digits_mlp, space, Objective.default(), run_dir=tmp_path / "probe")
    with private_ray(HERE):
        res = run(
            digits_mlp, space, trials=len(first), workers=1, seed=0, sensitivity=True,
            run_dir=tmp_path / "run", progress=True,
        )  # fmt: skip
        assert any((res.run_dir / "sensitivity").iterdir())
        err = capsys.readouterr().err
        units = len(space.free_groups())
        said = [ln for ln in err.splitlines() if ln.startswith("autocompress: sensitivity ")]
        assert [ln.split()[2] for ln in said] == [f"{i}/{units}" for i in range(1, units + 1)]
        got = {json.dumps(Plan.from_json(p).to_dict()) for p in res.trials["plan_json"]}
        assert got == {json.dumps(p.to_dict()) for p in first}  # the warm start, nothing else
        run_json = json.loads((res.run_dir / "run.json").read_text())
        assert run_json["settings"]["sensitivity"] is True
        entries = list(cache_root.iterdir())
        assert len(entries) == 1  # the teacher was exported into the cache once
        again = run(
            digits_mlp, space, trials=1, workers=1, seed=0, run_dir=tmp_path / "run2",
            progress=False, baselines=[],
        )  # fmt: skip
    assert list(cache_root.iterdir()) == entries  # a hit: no new entry
    assert again.teacher["size_bytes"] == res.teacher["size_bytes"]
