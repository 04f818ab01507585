"""Compression spaces (searchable knobs) and plans (one concrete configuration).

Plans, knob specs and :class:`Knobs` import no torch (``config.py`` reads them to check a YAML
file fast); the names that need torch (discovery, :class:`CompressionSpace`) are imported on
first use (a module ``__getattr__``, PEP 562).

Example:
    >>> from autocompress.spaces import KNOBS, Plan
    >>> sorted(KNOBS)[:2], Plan().width
    (['bits', 'heads'], 1.0)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autocompress.spaces._knobs import KNOBS, Knobs, KnobSpec, register
from autocompress.spaces._plan import ALLOWED_BITS, SCHEMES, FinetuneSettings, LayerPlan, Plan

if TYPE_CHECKING:
    from autocompress.spaces._discover import LayerInfo, discover_layers
    from autocompress.spaces._space import CompressionSpace

_LAZY = {
    "CompressionSpace": "autocompress.spaces._space",
    "LayerInfo": "autocompress.spaces._discover",
    "discover_layers": "autocompress.spaces._discover",
}

__all__ = [
    "ALLOWED_BITS",
    "KNOBS",
    "SCHEMES",
    "CompressionSpace",
    "FinetuneSettings",
    "KnobSpec",
    "Knobs",
    "LayerInfo",
    "LayerPlan",
    "Plan",
    "discover_layers",
    "register",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
