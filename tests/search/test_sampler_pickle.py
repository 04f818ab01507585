"""Every sampler the search can build survives pickling: Ray Tune pickles the searcher (and so
its Optuna sampler) when the Tuner starts and at every searcher checkpoint. optuna 5.1.0's
NSGA-II holds a ``threading.Lock`` and cannot be pickled; pyproject pins below it."""

from __future__ import annotations

import pickle

import pytest

from autocompress.search._common import SAMPLERS
from autocompress.search._searcher import make_sampler


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_pickles(name: str) -> None:
    sampler = make_sampler(name, seed=3, trials=20)
    back = pickle.loads(pickle.dumps(sampler))
    assert type(back) is type(sampler)
