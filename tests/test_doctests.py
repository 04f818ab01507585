"""Run every docstring example in the package (docs that run, as in Optuna and scikit-learn)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import autocompress

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(autocompress.__path__, "autocompress.")
    if not m.name.endswith("cli")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
