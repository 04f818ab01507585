"""Tasks: models, data and evaluation to compress against."""

from __future__ import annotations

from autocompress.tasks._base import Task, TrainSettings, accuracy_metric, cache_dir
from autocompress.tasks._registry import get_task, register_task, task_names

__all__ = [
    "Task",
    "TrainSettings",
    "accuracy_metric",
    "cache_dir",
    "get_task",
    "register_task",
    "task_names",
]
