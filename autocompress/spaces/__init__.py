"""Compression spaces (searchable knobs) and plans (one concrete configuration).

Plans, knob specs and :class:`Knobs` import no torch (``config.py`` reads them to check a YAML
file fast); the names that need torch (discovery, :class:`CompressionSpace`) are imported on
first use (a module ``__getattr__``, PEP 562).

Example:
    >>> from autocompress.spaces import KNOBS, Plan
    >>> "bits" in KNOBS, Plan().width
    (True, 1.0)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autocompress.spaces._knobs import KNOBS, Knobs, KnobSpec, register
from autocompress.spaces._plan import ALLOWED_BITS, SCHEMES, FinetuneSettings, LayerPlan, Plan
from autocompress.spaces._roles import ROLES, group_by_role, layer_roles, role_groups

if TYPE_CHECKING:
    from autocompress.spaces._discover import LayerInfo, discover_layers
    from autocompress.spaces._sensitivity import (
        Sensitivity,
        greedy_plans,
        hand_plans,
        sensitivity,
        sensitivity_plans,
    )
    from autocompress.spaces._space import CompressionSpace

_SENS = "autocompress.spaces._sensitivity"
_LAZY = {
    "CompressionSpace": "autocompress.spaces._space",
    "Sensitivity": _SENS,
    "greedy_plans": _SENS,
    "hand_plans": _SENS,
    "sensitivity": _SENS,
    "sensitivity_plans": _SENS,
    "LayerInfo": "autocompress.spaces._discover",
    "discover_layers": "autocompress.spaces._discover",
}

__all__ = [
    "ALLOWED_BITS",
    "KNOBS",
    "ROLES",
    "SCHEMES",
    "CompressionSpace",
    "FinetuneSettings",
    "KnobSpec",
    "Knobs",
    "LayerInfo",
    "LayerPlan",
    "Plan",
    "Sensitivity",
    "discover_layers",
    "greedy_plans",
    "group_by_role",
    "hand_plans",
    "layer_roles",
    "register",
    "role_groups",
    "sensitivity",
    "sensitivity_plans",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
