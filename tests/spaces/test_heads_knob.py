"""The heads knob: sampled apart from width on transformers whose attention is understood."""

from __future__ import annotations

import optuna
import pytest

from autocompress._zoo import ZOO
from autocompress.spaces import CompressionSpace, Knobs

pytest.importorskip("transformers")


def _plans(space: CompressionSpace, n: int = 8) -> list:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return [space.suggest(study.ask()) for _ in range(n)]


def test_heads_sampled_separately_from_width_on_bert() -> None:
    space = CompressionSpace.from_model(
        ZOO["bert"].build(), Knobs(sparsity=None, bits=(8,), width=(0.5, 1.0), heads=(0.25, 1.0))
    )
    assert len(space.attention) == 2 and not space.unknown_attention
    plans = _plans(space)
    assert all(p.heads is not None and 0.25 <= p.heads <= 1.0 for p in plans)
    assert any(p.heads != p.width for p in plans)  # two knobs, not one


def test_without_heads_knob_heads_follow_width() -> None:
    space = CompressionSpace.from_model(ZOO["llama"].build(), Knobs(width=(0.5, 1.0)))
    assert all(p.heads is None and p.head_fraction == p.width for p in _plans(space))


def test_models_without_attention_never_sample_heads() -> None:
    space = CompressionSpace.from_model(
        ZOO["residual-cnn"].build(), Knobs(width=(0.5, 1.0), heads=(0.5, 1.0))
    )
    assert space.attention == () and all(p.heads is None for p in _plans(space))


def test_bad_heads_range_is_refused() -> None:
    from autocompress import PlanError

    with pytest.raises(PlanError, match="heads"):
        Knobs(heads=(0.0, 1.0))
