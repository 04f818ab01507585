"""Compression spaces (searchable knobs) and plans (one concrete configuration)."""

from __future__ import annotations

from autocompress.spaces._discover import LayerInfo, discover_layers
from autocompress.spaces._plan import ALLOWED_BITS, SCHEMES, FinetuneSettings, LayerPlan, Plan
from autocompress.spaces._space import CompressionSpace, Knobs

__all__ = [
    "ALLOWED_BITS",
    "SCHEMES",
    "CompressionSpace",
    "FinetuneSettings",
    "Knobs",
    "LayerInfo",
    "LayerPlan",
    "Plan",
    "discover_layers",
]
