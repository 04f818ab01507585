"""autocompress: search for the best way to compress a neural network.

The public API is re-exported here; implementation modules are private and may move. The
re-exports are lazy (a module ``__getattr__``, PEP 562): ``import autocompress`` and
``autocompress --help`` do not import torch or Ray until a name that needs them is used, while
``from autocompress import Task`` works as usual.

Example:
    >>> import autocompress
    >>> autocompress.Plan().width
    1.0
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autocompress.errors import ArtifactError, AutocompressError, ConfigError, PlanError

__version__ = "0.1.0"

_LAZY = {
    "Artifact": "autocompress.artifacts",
    "export": "autocompress.artifacts",
    "inspect_artifact": "autocompress.artifacts",
    "load": "autocompress.artifacts",
    "Constraint": "autocompress.objectives",
    "Metric": "autocompress.objectives",
    "Objective": "autocompress.objectives",
    "register_metric": "autocompress.objectives",
    "EarlyStop": "autocompress.search",
    "SearchResult": "autocompress.search",
    "CompressionSpace": "autocompress.spaces",
    "FinetuneSettings": "autocompress.spaces",
    "Knobs": "autocompress.spaces",
    "LayerPlan": "autocompress.spaces",
    "Plan": "autocompress.spaces",
    "Task": "autocompress.tasks",
    "TrainSettings": "autocompress.tasks",
    "get_task": "autocompress.tasks",
    "register_task": "autocompress.tasks",
}
_SUBMODULES = ("compress", "search")

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from autocompress import compress, search
    from autocompress.artifacts import Artifact, export, inspect_artifact, load
    from autocompress.objectives import Constraint, Metric, Objective, register_metric
    from autocompress.search import EarlyStop, SearchResult
    from autocompress.spaces import CompressionSpace, FinetuneSettings, Knobs, LayerPlan, Plan
    from autocompress.tasks import Task, TrainSettings, get_task, register_task


def __getattr__(name: str) -> Any:
    """Import a public name (or the ``compress`` / ``search`` module) on first use."""
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f"autocompress.{name}")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'autocompress' has no attribute {name!r}")
    globals()[name] = value  # cached: __getattr__ runs once per name
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Artifact",
    "ArtifactError",
    "AutocompressError",
    "CompressionSpace",
    "ConfigError",
    "EarlyStop",
    "Constraint",
    "FinetuneSettings",
    "Knobs",
    "LayerPlan",
    "Metric",
    "Objective",
    "Plan",
    "PlanError",
    "SearchResult",
    "Task",
    "TrainSettings",
    "compress",
    "export",
    "get_task",
    "inspect_artifact",
    "load",
    "register_metric",
    "register_task",
    "search",
]
