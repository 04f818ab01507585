"""autocompress: search for the best way to compress a neural network."""

from __future__ import annotations

from autocompress.errors import ArtifactError, AutocompressError, ConfigError, PlanError
from autocompress.spaces._plan import FinetuneSettings, LayerPlan, Plan
from autocompress.tasks import Task, TrainSettings, get_task

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "AutocompressError",
    "ConfigError",
    "FinetuneSettings",
    "LayerPlan",
    "Plan",
    "PlanError",
    "Task",
    "TrainSettings",
    "get_task",
]
