"""Names shared by the driver, the searcher and the trial function (no heavy imports)."""

from __future__ import annotations

SAMPLERS = ("nsga2", "tpe", "gp", "random")
STUDY_NAME = "autocompress"
CONSTRAINT_PREFIX = "cv_"
"""Reported keys ``cv_0, cv_1, ...`` hold the constraint values (<= 0 feasible)."""
