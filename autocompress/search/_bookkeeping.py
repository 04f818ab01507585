"""Keep Ray Tune's per-trial bookkeeping in the driver small, so a long run's memory stays flat.

Tune keeps one ``Trial`` object per trial for the whole run, finished ones included. Most of its
size is running statistics of every numeric result key (``run_metadata.metric_n_steps``: two
deques per key, ``metric_analysis``, their cached JSON) and a copy of the config inside the last
result: about 66 KB per digits-mlp trial, measured with ``sys.getsizeof`` over the object graph.
autocompress never reads them (trial records on disk are the source of truth, and the result
grid is read for ``config``, ``error`` and ``status`` only), so they are dropped as soon as a
trial ends: 24 KB per trial remain.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback


def trim(trial: Any) -> None:
    """Drop a finished trial's running statistics and the config copy in its last result."""
    md = getattr(trial, "run_metadata", None)
    if md is None:
        return
    if isinstance(md.last_result, dict):
        md.last_result.pop("config", None)
    md.metric_n_steps = {}  # assignment also invalidates the metadata's cached JSON
    md.metric_analysis = {}


class TrimFinishedTrials(Callback):
    """Tune callback: :func:`trim` every trial when it completes or errors."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trim(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trim(trial)


JOURNAL_PUSH_S = 30.0
"""The study journal is uploaded at most this often while a run on object storage runs (and
always at its end): resume never needs it (records are the source of truth), dashboards do."""


class SyncRemoteRun(Callback):
    """Tune callback of a run on object storage: the record of every trial that reports (or
    errors) is pulled into the driver's mirror, and the study journal is pushed now and then.

    Placed before the progress callback, which reads records from the mirror.
    """

    def __init__(self, uri: str, mirror: str) -> None:
        self.uri, self.mirror = uri, mirror
        self._pushed = 0.0

    def _sync(self, trial: Any) -> None:
        import time
        from pathlib import Path

        from autocompress.search._common import STUDY_FILE
        from autocompress.search._storage import Remote

        remote = Remote(self.uri)
        try:  # a passing network error must not stop the search: the end pulls every record
            remote.pull_record(Path(self.mirror), str(trial.trial_id))
            if time.monotonic() - self._pushed > JOURNAL_PUSH_S:
                remote.push(Path(self.mirror), [STUDY_FILE])
                self._pushed = time.monotonic()
        except Exception as e:
            import logging

            logging.getLogger(__name__).warning("syncing with %s failed: %s", self.uri, e)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if result.get("status") in ("COMPLETE", "FAILED"):
            self._sync(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._sync(trial)
