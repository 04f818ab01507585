"""SearchResult: the trials and Pareto tables of a run, its artifacts, reopened from disk."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autocompress.errors import ArtifactError, AutocompressError
from autocompress.search._pareto import hypervolume_history
from autocompress.search._tables import read_csv

if TYPE_CHECKING:
    from torch import nn

RESULT_VERSION = 1
MAX_JSON_BYTES = 64 << 20


@dataclass
class SearchResult:
    """The outcome of :func:`autocompress.search.run`, all of it plain files in ``run_dir``.

    Args:
        run_dir: the run directory.
        trials: one row per trial (``trials.csv``): id, status, failure reason, plan knobs
            (``fc1.sparsity``, ``fc1.bits``, ..., ``width``), validation metrics,
            ``accuracy_drop``, ``feasible``, ``violation``, ``duration_s``, ``artifact``.
        pareto: the feasible non-dominated trials (``pareto.csv``), with ``test_*`` metrics
            measured by reloading each artifact from disk.
        teacher: the teacher's artifact size and val/test metrics.
        objective: the objective's description (metrics, directions, constraints, weights).
        message: why the front is empty (e.g. no trial is feasible, naming the closest), or None.
        info: everything else in ``result.json`` (settings, counts, wall time).
        source: the run's URI when it lives on object storage (``run_dir`` is then a local
            copy: tables and front artifacts; other artifacts are downloaded when asked for),
            else None.

    Example:
        >>> result = SearchResult.load("runs/latest")  # doctest: +SKIP
        >>> print(result.summary())  # doctest: +SKIP
    """

    run_dir: Path
    trials: pd.DataFrame
    pareto: pd.DataFrame
    teacher: dict[str, Any]
    objective: dict[str, Any]
    message: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    # --- files -----------------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> SearchResult:
        """Reopen a finished run from ``trials.csv``, ``pareto.csv`` and ``result.json``.

        ``run_dir`` may be the URI of a run on object storage (``s3://bucket/run``): its
        tables and front are downloaded to a local copy first.
        """
        from dataclasses import replace

        from autocompress.search._storage import is_uri, open_run

        if is_uri(run_dir):
            local, remote = open_run(str(run_dir))
            try:
                return replace(cls.load(local), source=str(run_dir))
            except AutocompressError as e:  # name the URI, not the local copy
                raise AutocompressError(str(e).replace(str(local), str(run_dir))) from None
        d = Path(run_dir)
        path = d / "result.json"
        if not d.is_dir():
            raise AutocompressError(f"run directory {str(d)!r} does not exist: check the path")
        if not path.is_file():
            raise AutocompressError(
                f"{str(d)!r} has no result.json: it is not a finished run (resume it to finish)"
            )
        try:
            if path.stat().st_size > MAX_JSON_BYTES:
                raise ValueError(f"{path.stat().st_size} bytes is absurd for result.json")
            info = json.loads(path.read_bytes())
            if not isinstance(info, dict):
                raise ValueError(f"expected a JSON object, got {type(info).__name__}")
            missing = {"teacher", "objective", "_version"} - set(info)
            if missing:
                raise ValueError(f"keys {sorted(missing)} are missing")
            for name in ("trials.csv", "pareto.csv"):
                if not (d / name).is_file():
                    raise ValueError(f"{name} is missing")
        except (OSError, ValueError) as e:
            raise AutocompressError(
                f"{str(d)!r} is not a readable run ({e}): resume it with --resume to rewrite "
                "its tables from the trial records"
            ) from None
        if info.get("_version") != RESULT_VERSION:
            raise AutocompressError(
                f"{str(path)!r} has _version={info.get('_version')!r}, this autocompress reads "
                f"{RESULT_VERSION}: use the autocompress version that wrote it"
            )
        return cls(
            run_dir=d,
            trials=read_csv(d / "trials.csv"),
            pareto=read_csv(d / "pareto.csv"),
            teacher=info.pop("teacher"),
            objective=info.pop("objective"),
            message=info.pop("message", None),
            info=info,
        )

    def artifact_path(self, trial_id: str) -> Path:
        """Directory of ``trial_id``'s artifact (a duplicate resolves to its original)."""
        rows = self.trials[self.trials["trial_id"] == str(trial_id)]
        if rows.empty:
            raise AutocompressError(
                f"no trial {trial_id!r} in {str(self.run_dir)!r}: see result.trials['trial_id']"
            )
        tid = str(rows.iloc[0]["duplicate_of"] or trial_id)
        orig = self.trials[self.trials["trial_id"] == tid]
        recorded = str(orig.iloc[0]["artifact"]) if len(orig) else ""
        places = [self.run_dir / "pareto" / tid, self.run_dir / "trials" / tid]
        if recorded:
            places.insert(0, self.run_dir / recorded)  # an adopted trial keeps its directory
        for p in places:
            if (p / "manifest.json").is_file():
                return p
        if self.source is not None:  # on object storage: download it
            from autocompress.search._storage import Remote

            Remote(self.source).fetch_artifact(self.run_dir, tid, recorded)
            for p in places:
                if (p / "manifest.json").is_file():
                    return p
        kept = self.info.get("settings", {}).get("keep_artifacts", "pareto")
        raise AutocompressError(
            f"trial {trial_id!r} has no artifact on disk (status {rows.iloc[0]['status']}, "
            f"keep_artifacts={kept!r}): use a front trial or run with keep_artifacts='all'"
        )

    def load_model(self, trial_id: str, model: nn.Module | None = None) -> nn.Module:
        """The compressed model of ``trial_id``, rebuilt from its artifact on disk.

        ``model`` is the uncompressed architecture; by default the artifact's task rebuilds it.
        """
        from autocompress.artifacts import load

        return load(self.artifact_path(trial_id), model=model)

    def export(self, trial_id: str, out_dir: str | os.PathLike[str]) -> Path:
        """Copy ``trial_id``'s artifact directory to ``out_dir`` (which must not exist).

        The artifact is verified (every file's size and sha256 against its manifest, as
        :func:`~autocompress.artifacts.load` does) before and after the copy; a corrupt one
        raises :class:`~autocompress.errors.ArtifactError` and nothing is left at ``out_dir``.
        """
        from autocompress.artifacts._io import read_verified

        src, dst = self.artifact_path(trial_id), Path(out_dir)
        if dst.exists():
            raise AutocompressError(f"{str(dst)!r} already exists: choose a new directory")
        try:
            read_verified(src)
        except ArtifactError as e:
            raise ArtifactError(f"trial {trial_id!r}: {e}; nothing was copied") from None
        tmp = dst.with_name(f".{dst.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(src, tmp)
            read_verified(tmp)
            os.replace(tmp, dst)
        except (OSError, ArtifactError):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dst

    def study(self) -> Any:
        """The run's Optuna study (``optuna.journal``), for Optuna's own analysis and plots.

        Values told to Optuna are on the sampler's scale: metrics searched on a log scale
        (``size_bytes``, latencies, ...) appear there as ``log10`` of the value; the tables of
        this result always hold the metrics themselves.

        Example:
            >>> study = SearchResult.load("runs/latest").study()  # doctest: +SKIP
            >>> len(study.trials)  # doctest: +SKIP
        """
        import optuna

        from autocompress.search._common import STUDY_FILE, STUDY_NAME
        from autocompress.search._journal import study_storage

        if not (self.run_dir / STUDY_FILE).is_file():
            raise AutocompressError(f"{str(self.run_dir)!r} has no {STUDY_FILE}")
        return optuna.load_study(
            study_name=STUDY_NAME, storage=study_storage(self.run_dir, writer=False)
        )

    # --- analysis --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The objective's metric names."""
        return [m["name"] for m in self.objective["metrics"]]

    @property
    def directions(self) -> list[str]:
        """The objective's metric directions."""
        return [m["direction"] for m in self.objective["metrics"]]

    def hypervolume_history(self) -> pd.DataFrame:
        """Hypervolume of the feasible front after each finished trial.

        Columns ``n_trials``, ``trial_id``, ``hypervolume``; metrics normalized to [0, 1] over
        the run (size-like metrics on a log10 scale), reference point 1.1 per metric.
        """
        t = self.trials[self.trials["status"].isin(["COMPLETE", "FAILED"])]
        vals = t[self.names].to_numpy(dtype=float, copy=True)
        ok = (t["status"] == "COMPLETE").to_numpy() & t["feasible"].astype(bool).to_numpy()
        vals[~ok] = np.nan
        hv = hypervolume_history(vals, self.directions, self.names)
        return pd.DataFrame(
            {
                "n_trials": np.arange(1, len(t) + 1),
                "trial_id": t["trial_id"].tolist(),
                "hypervolume": hv,
            }
        )

    def summary(self, max_rows: int = 20) -> str:
        """A short text report: counts, teacher, objective and the front table."""
        t = self.trials
        n_ok = int((t["status"] == "COMPLETE").sum()) if len(t) else 0
        n_fail = int((t["status"] == "FAILED").sum()) if len(t) else 0
        n_feas = int(t["feasible"].astype(bool).sum()) if len(t) else 0
        n_stop = int((t["status"] == "STOPPED").sum()) if len(t) else 0
        stopped = f", {n_stop} stopped" if n_stop else ""
        obj = ", ".join(f"{m['direction']} {m['name']}" for m in self.objective["metrics"])
        cons = "; ".join(self.objective["constraints"]) or "none"
        tv, tt = self.teacher.get("val", {}), self.teacher.get("test", {})
        lines = [
            f"run {self.source or self.run_dir}: {len(t)} trials "
            f"({n_ok} complete, {n_fail} failed{stopped}), "
            f"{n_feas} feasible, front {len(self.pareto)}",
            f"teacher: accuracy {tv.get('accuracy', float('nan')):.4f} val / "
            f"{tt.get('accuracy', float('nan')):.4f} test, {self.teacher['size_bytes']:,} bytes",
            f"objective: {obj}; constraints: {cons}",
        ]
        if self.message:
            lines.append(self.message)
        if len(self.pareto):
            cols = ["trial_id", *self.names]
            cols += [c for c in ("accuracy_drop", "compression_ratio") if c not in cols]
            cols += [f"test_{n}" for n in self.names if f"test_{n}" in self.pareto.columns]
            cols = [c for c in dict.fromkeys(cols) if c in self.pareto.columns]
            lines.append(self.pareto[cols].head(max_rows).to_string(index=False))
        return "\n".join(lines)
