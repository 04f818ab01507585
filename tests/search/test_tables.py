"""The trials table survives its CSV round trip: ids stay text whatever their digits."""

from __future__ import annotations

import json
from pathlib import Path

from autocompress.search._tables import STR_COLUMNS, read_csv, trial_rows, write_csv


def _rec(tid: str, **extra: object) -> dict[str, object]:
    plan = json.dumps({"layers": {"fc": {"sparsity": 0.5, "bits": 4}}, "width": 1.0})
    rec: dict[str, object] = {
        "trial_id": tid,
        "status": "COMPLETE",
        "plan_json": plan,
        "values": {"accuracy": 0.9, "size_bytes": 100.0},
        "feasible": True,
        "violation": 0.0,
        "finished_at": 1.0,
        "duration_s": 1.0,
        "artifact": f"artifacts/{tid}",
    }
    rec.update(extra)
    return rec


def test_all_digit_ids_stay_text_in_every_id_column(tmp_path: Path) -> None:
    # Trial ids are 8 hex digits, so some are all digits ("05345036"), or read as floats
    # ("1e500000"); CI once saw refined_from come back as 5345036.0 and lose its link.
    records = {
        "05345036": _rec("05345036"),
        "1e500000": _rec("1e500000"),
        "98466341": _rec("98466341", refined_from="05345036"),
        "00000007": _rec("00000007", refined_from="1e500000", duplicate_of="05345036"),
    }
    tune = {t: {} for t in records}
    df = trial_rows(tune, records, ["accuracy", "size_bytes"])
    back = write_csv(df, tmp_path / "trials.csv")
    for col in ("trial_id", "refined_from", "duplicate_of"):
        assert col in STR_COLUMNS
        assert list(back[col]) == list(df[col]), col
    assert set(back["refined_from"]) - {""} <= set(back["trial_id"])
    assert list(read_csv(tmp_path / "trials.csv")["trial_id"]) == list(df["trial_id"])
