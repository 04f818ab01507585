"""Tasks: models, data and evaluation to compress against."""

from __future__ import annotations

from autocompress.tasks._base import (
    Task,
    TrainSettings,
    accuracy_metric,
    cache_dir,
    cosine_metric,
    metric_arity,
    neg_mse_metric,
)
from autocompress.tasks._data import DictDataset
from autocompress.tasks._registry import get_task, register_task, task_names

__all__ = [
    "DictDataset",
    "Task",
    "TrainSettings",
    "accuracy_metric",
    "cache_dir",
    "cosine_metric",
    "get_task",
    "metric_arity",
    "neg_mse_metric",
    "register_task",
    "task_names",
]
