"""Screen-then-refine searches: cheap calibration-only trials, the best re-run fully."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from raykit import private_ray

from autocompress import ConfigError, FinetuneSettings, Task
from autocompress.objectives import Objective
from autocompress.search import run
from autocompress.search._tables import front_mask
from autocompress.search._tune import pick_promising, screening_space
from autocompress.spaces import CompressionSpace, Knobs, Plan

HERE = Path(__file__).resolve().parent
FT = FinetuneSettings(epochs=3)


def _rec(tid: str, acc: float, size: float, **kw) -> dict:
    rec = {"trial_id": tid, "status": "COMPLETE", "feasible": True, "plan_json": "{}"}
    return {**rec, "values": {"accuracy": acc, "size_bytes": size}, **kw}


def test_pick_promising_spreads_along_the_fronts_feasible_first() -> None:
    obj = Objective(["accuracy", "size_bytes"])
    recs = [_rec("a", 0.9, 100), _rec("b", 0.8, 50), _rec("c", 0.7, 20), _rec("d", 0.6, 10)]
    recs += [_rec("e", 0.85, 120), _rec("f", 0.99, 1, status="FAILED")]
    recs += [_rec("g", 0.99, 1, duplicate_of="a"), _rec("h", 0.99, 1, feasible=False)]
    by_id = {r["trial_id"]: r for r in recs}
    ids = lambda k: [r["trial_id"] for r in pick_promising(by_id, obj, k)]  # noqa: E731
    assert ids(2) == ["a", "d"]  # both ends of the front (a, b, c, d), best score first
    assert ids(3) == ["a", "b", "d"] or ids(3) == ["a", "c", "d"]
    assert ids(5) == ["a", "b", "c", "d", "e"]  # e is on the second front
    assert ids(9) == ["a", "b", "c", "d", "e", "h"]  # infeasible last; failed, duplicate never


def test_screening_space_only_changes_the_fine_tune(digits_mlp: Task) -> None:
    space = CompressionSpace.from_model(digits_mlp.teacher(), Knobs(), finetune=FT)
    assert screening_space(space, 0).finetune == FinetuneSettings(epochs=0)
    assert screening_space(space, 7).finetune == FinetuneSettings(epochs=3, max_steps=7)
    assert screening_space(space, 0).layers == space.layers
    assert space.finetune == FT  # the input is untouched


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_refine_raises(digits_mlp: Task, tmp_path: Path, bad) -> None:
    space = CompressionSpace.from_model(digits_mlp.teacher(), Knobs(), finetune=FT)
    with pytest.raises(ConfigError, match="refine="):
        run(digits_mlp, space, trials=2, refine=bad, run_dir=tmp_path / "r", progress=False)


def test_refined_trials_join_the_table_with_the_full_fine_tune(
    digits_mlp: Task, tmp_path: Path, capsys
) -> None:
    knobs = Knobs(sparsity=(0.5, 0.9), bits=(4, 8))
    space = CompressionSpace.from_model(digits_mlp.teacher(), knobs, finetune=FT)
    with private_ray(HERE):
        res = run(
            digits_mlp, space, trials=6, workers=2, refine=2, seed=0,
            run_dir=tmp_path / "run", progress=True, keep_artifacts="all",
        )  # fmt: skip
    df = res.trials
    # the refine stage says when it starts and what each fine-tune scored
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("refine: ")]
    assert [ln.split(" | ")[0] for ln in said] == [
        f"refine: {i}/2 plans fine-tuned" for i in range(3)
    ]
    named = {ln.split(" | ")[1].split(":")[0] for ln in said[1:]}
    assert named == set(df["refined_from"].dropna().astype(str)) - {""}
    assert all("accuracy" in ln and "feasible" in ln for ln in said[1:])
    assert len(df) == 8 and (df["status"] == "COMPLETE").all()
    refined = df[df["refined_from"].fillna("").astype(str) != ""]
    screened = df[df["refined_from"].fillna("").astype(str) == ""]
    assert len(refined) == 2 and len(screened) == 6
    assert set(refined["refined_from"]) <= set(screened["trial_id"])
    for _, row in refined.iterrows():
        plan = Plan.from_json(row["plan_json"])
        assert plan.finetune == FT
        orig = Plan.from_json(screened.set_index("trial_id").loc[row["refined_from"], "plan_json"])
        assert orig.finetune == FinetuneSettings(epochs=0)
        assert orig.replace(finetune=FT) == plan  # the same compression, fully fine-tuned
        rec = json.loads((res.run_dir / "records" / f"{row['trial_id']}.json").read_text())
        assert rec["refined_from"] == row["refined_from"] and rec["timing"]["finetune_s"] > 0
    # the front is computed over every trial, screened and refined alike
    mask = front_mask(df, res.names, res.directions)
    assert sorted(res.pareto["trial_id"]) == sorted(df.loc[mask, "trial_id"])
    # fine-tuning a 4-8-bit plan for 3 epochs beats calibrating it only
    acc = df.set_index("trial_id")["accuracy"]
    assert all(acc[r.trial_id] >= acc[r.refined_from] for r in refined.itertuples())
    assert json.loads((res.run_dir / "run.json").read_text())["settings"]["refine"] == 2
