"""Trials and Pareto tables: built from the trial records, written as CSV, read back."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autocompress.search._pareto import non_dominated

STR_COLUMNS = (
    "trial_id",
    "status",
    "reason",
    "duplicate_of",
    "refined_from",
    "artifact",
    "plan_json",
    "test_error",
)
FIRST_VALUES = ("accuracy", "accuracy_drop", "size_bytes", "compression_ratio")
_DEFAULT_KNOB = {"scheme": "uniform", "rank_ratio": 1.0}


def plan_knobs(plan_json: str | None) -> dict[str, Any]:
    """Flatten a plan: ``{"fc1.sparsity": 0.9, "fc1.bits": 4, ..., "width": 1.0}``."""
    if not plan_json:
        return {}
    d = json.loads(plan_json)
    out: dict[str, Any] = {}
    for layer, knobs in sorted(d.get("layers", {}).items()):
        for k in ("sparsity", "bits", "scheme", "rank_ratio"):
            if k in knobs:
                out[f"{layer}.{k}"] = knobs[k]
    out["width"] = d.get("width", 1.0)
    return out


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def trial_rows(
    tune_trials: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    objective_names: Sequence[str],
) -> pd.DataFrame:
    """One row per Tune trial, ordered by finish time.

    ``tune_trials`` maps trial id -> ``{"error": reason or None, "plan_json": ...}`` (from the
    result grid); ``records`` are the trials' own records. A trial without a record crashed
    (FAILED, with Tune's error) or was stopped before it finished (STOPPED).
    """
    rows = []
    for tid, info in tune_trials.items():
        rec = records.get(tid)
        if rec is None:
            status = "FAILED" if info.get("error") else "STOPPED"
            reason = info.get("error") or "stopped before it finished (time_budget or interrupt)"
            rec = {"trial_id": tid, "status": status, "reason": reason}
            rec.update(plan_json=info.get("plan_json"), values={})
        rows.append(rec)
    rows.sort(key=lambda r: (_num(r.get("finished_at") or math.inf), r["trial_id"]))
    value_names = list(objective_names) + [n for n in FIRST_VALUES if n not in objective_names]
    extra = sorted({k for r in rows for k in r.get("values", {})} - set(value_names) - {"score"})
    value_names += extra + (["score"] if any("score" in r.get("values", {}) for r in rows) else [])
    early = any("early_stopped" in r for r in rows)
    refined = any(r.get("refined_from") for r in rows)
    out = []
    for r in rows:
        ok = r["status"] == "COMPLETE"
        row: dict[str, Any] = {
            "trial_id": r["trial_id"],
            "status": r["status"],
            "reason": r.get("reason") or "",
            "duplicate_of": r.get("duplicate_of") or "",
        }
        row.update(plan_knobs(r.get("plan_json")))
        vals = r.get("values", {}) if ok else {}
        row.update({n: float(vals.get(n, math.nan)) for n in value_names})
        row["feasible"] = bool(r.get("feasible", False)) and ok
        row["violation"] = float(r["violation"]) if ok else math.nan
        row["duration_s"] = _num(r.get("duration_s"))
        row["finished_at"] = _num(r.get("finished_at"))
        keep = ok and not r.get("duplicate_of")
        row["artifact"] = (r.get("artifact") or "") if keep else ""
        row["plan_json"] = r.get("plan_json") or ""
        if early:  # the epoch a hopeless fine-tune stopped at
            row["early_stopped"] = _num(r.get("early_stopped"))
        if refined:  # the screened trial this one re-ran with the full fine-tune
            row["refined_from"] = r.get("refined_from") or ""
        out.append(row)
    df = pd.DataFrame(out)
    if df.empty:
        return pd.DataFrame(columns=["trial_id", "status", "reason", "feasible"])
    knob_cols = [c for c in df.columns if "." in c or c == "width"]
    for c in knob_cols:  # drop knobs no trial used (e.g. scheme when only uniform is searched)
        knob = c.rsplit(".", 1)[-1]
        if knob in _DEFAULT_KNOB and (df[c].isna() | (df[c] == _DEFAULT_KNOB[knob])).all():
            df = df.drop(columns=c)
    return df


def front_mask(trials: pd.DataFrame, names: Sequence[str], directions: Sequence[str]) -> np.ndarray:
    """Rows on the Pareto front: COMPLETE, feasible, not a duplicate, non-dominated."""
    if trials.empty:
        return np.zeros(0, dtype=bool)
    dup = trials["duplicate_of"].fillna("").astype(str) != ""
    eligible = (trials["status"] == "COMPLETE") & trials["feasible"].astype(bool) & ~dup
    mask = np.zeros(len(trials), dtype=bool)
    idx = np.flatnonzero(eligible.to_numpy())
    if len(idx):
        vals = trials.iloc[idx][list(names)].to_numpy(dtype=float, copy=True)
        mask[idx[non_dominated(vals, directions)]] = True
    return mask


def closest_trial(trials: pd.DataFrame) -> dict[str, Any] | None:
    """The COMPLETE trial with the smallest total constraint violation, or None."""
    if trials.empty:
        return None
    done = trials[trials["status"] == "COMPLETE"]
    if done.empty:
        return None
    row = done.loc[done["violation"].astype(float).idxmin()]
    return {"trial_id": str(row["trial_id"]), "violation": float(row["violation"])}


def write_csv(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Write ``df`` as CSV (atomically) and return it as read back, so saved == returned."""
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
    return read_csv(path)


def read_csv(path: Path) -> pd.DataFrame:
    """Read a trials/pareto CSV with ids and text as strings (an id like ``1e5`` stays text)."""
    head = pd.read_csv(path, nrows=0)
    dtype = {c: "str" for c in head.columns if c in STR_COLUMNS or c.endswith(".scheme")}
    df = pd.read_csv(path, dtype=dtype, keep_default_na=True)
    for c in dtype:
        df[c] = df[c].fillna("")
    return df
