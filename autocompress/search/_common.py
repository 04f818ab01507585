"""Names shared by the driver, the searcher and the trial function (no heavy imports)."""

from __future__ import annotations

SAMPLERS = ("nsga2", "tpe", "gp", "random")
STUDY_NAME = "autocompress"
STUDY_FILE = "optuna.journal"
"""The Optuna study of a run, ``run_dir/optuna.journal``: an append-only journal file (Optuna's
journal format, see ``_journal``), much cheaper per trial than a SQLite study, where every write
is a committed transaction; ``optuna-dashboard run_dir/optuna.journal`` opens it."""
CONSTRAINT_PREFIX = "cv_"
"""Reported keys ``cv_0, cv_1, ...`` hold the constraint values (<= 0 feasible)."""

REFINE_MARGIN = 1.0
"""Default ``refine_margin``: screened plans whose summed relative constraint violation is at
most this are refined first (see ``search._tune.pick_promising``)."""
