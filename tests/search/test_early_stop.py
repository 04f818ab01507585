"""Early stopping of hopeless candidates: the rule, the engine hook, the search end to end."""

from __future__ import annotations

import pytest

from autocompress import ConfigError, EarlyStop, FinetuneSettings, Plan, Task, compress
from autocompress.objectives import Objective


def test_rule_and_validation() -> None:
    stop = EarlyStop(after=0.5, margin=0.02).rule(floor=0.96, epochs=10)
    assert not stop(4, 0.1)  # too early to judge
    assert stop(5, 0.93) and not stop(5, 0.95)
    for bad in ({"after": 0}, {"after": 1.5}, {"margin": -0.1}, {"margin": 1}):
        with pytest.raises(ConfigError, match="early_stop"):
            EarlyStop(**bad)


def test_score_floor_comes_from_the_constraints() -> None:
    assert Objective(["accuracy"], ["accuracy_drop <= 0.02"]).score_floor(0.97) == 0.95
    assert Objective(["accuracy"], ["accuracy >= 0.9"]).score_floor(None) == 0.9
    assert Objective(["accuracy", "size_bytes"], ["size_bytes <= 1e5"]).score_floor(0.9) is None


def test_engine_stops_a_hopeless_fine_tune_after_the_ramp(digits_mlp: Task) -> None:
    ft = FinetuneSettings(epochs=12, patience=12)
    plan = Plan.uniform(["fc1", "fc2", "fc3"], sparsity=0.97, bits=2, finetune=ft)
    plan = plan.replace(width=0.1)
    asked: list[tuple[int, float]] = []

    def stop(done: int, best: float) -> bool:
        asked.append((done, best))
        return done >= 6

    small = compress.apply(digits_mlp.teacher(), plan, digits_mlp, stop=stop)
    assert asked and asked[0][0] >= round(12 * ft.ramp)  # never asked during the ramp
    assert asked[-1][0] == 6  # stopped there, not at epoch 12
    assert float((small.fc1.weight == 0).float().mean()) >= 0.96  # planned sparsity reached
    codebook = Plan.uniform(["fc1", "fc2", "fc3"], sparsity=0.5, bits=2, scheme="codebook")
    codebook = codebook.replace(finetune=ft)
    out = compress.apply(digits_mlp.teacher(), codebook, digits_mlp, stop=lambda d, b: True)
    assert len(set(out.fc1.weight.detach().flatten().tolist())) <= 2**2 + 1  # still clustered
