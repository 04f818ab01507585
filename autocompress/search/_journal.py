"""The Optuna study of a run: a journal file written by the driver, read by anyone.

Optuna's ``JournalFileBackend`` locks (creates and deletes a lock file) and fsyncs on every
append, about ten times per trial (each suggested parameter, constraint and result is a record):
20-30 ms per trial on a loaded 2-core machine. The driver is the one process that writes a run's
study (a second driver on the same run directory is refused: ``_checks.RunLock``), so
:class:`DriverJournal` appends without the lock and without an fsync per record; a
record handed to the OS survives a killed driver, and :func:`sync_journal` fsyncs the file when
the search ends (a power loss can drop the last records, which a resume rebuilds from the trial
records). Readers (``SearchResult.study()``, optuna-dashboard) use Optuna's own backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from autocompress.search._common import STUDY_FILE


class DriverJournal(JournalFileBackend):
    """``JournalFileBackend`` for the study's only writer: no lock file, no fsync per append."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "\n".join(json.dumps(entry, separators=(",", ":")) for entry in logs) + "\n"
        with open(self._file_path, "ab") as f:
            f.write(text.encode("utf-8"))


def study_storage(run_dir: str | os.PathLike[str], *, writer: bool = True) -> Any:
    """The Optuna storage of the run in ``run_dir`` (``run_dir/optuna.journal``).

    The driver (``writer``) first trims a last line cut by a kill, so appending after a resume
    never glues a new record onto a broken one, and removes a lock file an older version's
    killed driver left. Readers (``writer=False``) change nothing.
    """
    path = Path(run_dir) / STUDY_FILE
    if writer:
        repair_journal(path)
        Path(f"{path}.lock").unlink(missing_ok=True)
        return optuna.storages.JournalStorage(DriverJournal(str(path)))
    lock = JournalFileOpenLock(str(path))
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def sync_journal(run_dir: str | os.PathLike[str]) -> None:
    """fsync the run's journal (the driver appends without fsync)."""
    path = Path(run_dir) / STUDY_FILE
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


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
