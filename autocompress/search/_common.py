"""Names shared by the driver, the searcher and the trial function (no heavy imports)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SAMPLERS = ("nsga2", "tpe", "gp", "random")
STUDY_NAME = "autocompress"
STUDY_FILE = "optuna.journal"
"""The Optuna study of a run, ``run_dir/optuna.journal``: an append-only journal file (Optuna's
``JournalFileBackend``). One ask + suggest + tell costs a few ms on it against tens of ms on a
SQLite study (every SQLite write is a committed transaction); ``optuna-dashboard
run_dir/optuna.journal`` opens it."""
CONSTRAINT_PREFIX = "cv_"
"""Reported keys ``cv_0, cv_1, ...`` hold the constraint values (<= 0 feasible)."""


def study_storage(run_dir: str | os.PathLike[str], *, writer: bool = True) -> Any:
    """The Optuna storage of the run in ``run_dir`` (a journal file, see :data:`STUDY_FILE`).

    The driver (``writer``, the study's only writer) first trims a last line cut by a kill, so
    appending after a resume never glues a new record onto a broken one, and removes a lock file
    a killed driver left. Readers (``writer=False``) change nothing.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(run_dir) / STUDY_FILE
    if writer:
        repair_journal(path)
        Path(f"{path}.lock").unlink(missing_ok=True)
    lock = JournalFileOpenLock(str(path))
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def repair_journal(path: Path) -> None:
    """Cut a partial last line (a write interrupted by SIGKILL) off the journal at ``path``."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
