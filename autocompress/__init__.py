"""autocompress: search for the best way to compress a neural network.

The public API is re-exported here; implementation modules are private and may move.
"""

from __future__ import annotations

from autocompress import compress, search
from autocompress.artifacts import Artifact, export, inspect_artifact, load
from autocompress.errors import ArtifactError, AutocompressError, ConfigError, PlanError
from autocompress.objectives import Constraint, Metric, Objective, register_metric
from autocompress.search import EarlyStop, SearchResult
from autocompress.spaces import CompressionSpace, FinetuneSettings, Knobs, LayerPlan, Plan
from autocompress.tasks import Task, TrainSettings, get_task, register_task

__version__ = "0.1.0"

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
