"""Objectives: metrics (accuracy, size, ratio, params, yours), constraints and weights.

Example:
    >>> from autocompress.objectives import Objective
    >>> Objective.default().describe()["constraints"]
    ['accuracy_drop <= 0.01']
"""

from __future__ import annotations

from autocompress.objectives._constraint import DERIVED, Constraint
from autocompress.objectives._metric import (
    DIRECTIONS,
    Metric,
    Reference,
    get_metric,
    metric_names,
    register_metric,
    teacher_size_bytes,
)
from autocompress.objectives._objective import Objective

__all__ = [
    "DERIVED",
    "DIRECTIONS",
    "Constraint",
    "Metric",
    "Objective",
    "Reference",
    "get_metric",
    "metric_names",
    "register_metric",
    "teacher_size_bytes",
]
