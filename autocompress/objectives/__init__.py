"""Objectives: metrics (accuracy, size, latency, MACs, yours), constraints and weights.

Built-in metric names: ``accuracy`` (the task's score), ``size_bytes``, ``compression_ratio``,
``params``, ``latency_ms``, ``speedup``, ``macs``, ``bitops``, ``onnx_bytes``, and parametrized
latency names such as ``latency_ms_b1`` or ``speedup_b256_torch`` (see ``_deploy``).

Example:
    >>> from autocompress.objectives import Objective
    >>> Objective.default().describe()["constraints"]
    ['accuracy_drop <= 0.01']
    >>> Objective(["accuracy", "latency_ms_b1"], ["speedup >= 3"]).directions
    ['maximize', 'minimize']
"""

from __future__ import annotations

from autocompress.objectives._constraint import DERIVED, Constraint
from autocompress.objectives._deploy import (
    LatencySettings,
    latency_metric,
    speedup_metric,
)
from autocompress.objectives._metric import (
    DIRECTIONS,
    Metric,
    Reference,
    get_metric,
    is_metric_name,
    metric_names,
    register_family,
    register_metric,
    teacher_size_bytes,
)
from autocompress.objectives._objective import Objective

__all__ = [
    "DERIVED",
    "DIRECTIONS",
    "Constraint",
    "LatencySettings",
    "Metric",
    "Objective",
    "Reference",
    "get_metric",
    "is_metric_name",
    "latency_metric",
    "metric_names",
    "register_family",
    "register_metric",
    "speedup_metric",
    "teacher_size_bytes",
]
