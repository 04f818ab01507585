"""Shared pieces of the search benchmarks: spaces, hypervolume, plan builders, one-search runner.

Hypervolume is defined once, here, so every method and seed is scored the same way:

* objectives: **test** accuracy (maximize) and log10 of the real artifact bytes (minimize);
* points: the members of a run's front, chosen on **val** as the product does (feasible,
  non-dominated in (val accuracy, size)), each with the test accuracy of its artifact reloaded
  from disk (``pareto.csv``'s ``test_accuracy``);
* fixed reference point: accuracy ``0.8 x teacher test accuracy`` and ``log10(teacher bytes)``.

A member whose test accuracy falls under the reference adds nothing; a member dominated on test by
another adds nothing. The value is in "accuracy x decades of compression".
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
REF_ACC_FRACTION = 0.8
REUSE = False
"""When True, :func:`search` reopens a finished run found in ``run_dir`` instead of rerunning."""

# ----------------------------------------------------------------------------- hypervolume


def hv_reference(teacher_acc: float, teacher_bytes: float) -> tuple[float, float]:
    """The fixed reference point ``(accuracy, log10 bytes)`` shared by all methods."""
    return REF_ACC_FRACTION * teacher_acc, math.log10(teacher_bytes)


def hypervolume(
    acc: Sequence[float], size_bytes: Sequence[float], ref: tuple[float, float]
) -> float:
    """Exact 2-D hypervolume of points (accuracy up, log10 bytes down) bounded by ``ref``.

    Example:
        >>> hypervolume([0.9], [10.0], (0.8, 2.0))  # 0.1 accuracy x 1 decade
        0.1
    """
    ra, rs = ref
    pts = sorted(
        (math.log10(s), a)
        for a, s in zip(acc, size_bytes, strict=True)
        if math.isfinite(a) and s > 0 and a > ra and math.log10(s) < rs
    )
    hv, best = 0.0, ra
    # ascending log size: the slab [x_i, x_i+1) is covered up to the best accuracy seen so far
    xs = [p[0] for p in pts] + [rs]
    for i, (_, a) in enumerate(pts):
        best = max(best, a)
        hv += (xs[i + 1] - xs[i]) * (best - ra)
    return round(hv, 12)


def val_front(df: Any) -> Any:
    """Rows of ``df`` (trials or merged pareto tables) non-dominated in (val accuracy, size)."""
    from autocompress.search import non_dominated

    if len(df) == 0:
        return df
    if "feasible" in df:
        df = df[df["feasible"].astype(bool)]
    mask = non_dominated(
        df[["accuracy", "size_bytes"]].to_numpy(dtype=float, copy=True),
        ["maximize", "minimize"],
    )
    return df[mask]


MAX_DROP = 0.01
"""The benchmarks' accuracy constraint: at most 1 point below the teacher (on val in the search)."""


def val_chosen(
    front: Any,
    teacher_val_acc: float,
    *,
    by: str = "size_bytes",
    largest: bool = False,
    max_drop: float = MAX_DROP,
) -> Any:
    """The headline member of a front, chosen on **val** only; ``None`` if no member qualifies.

    Among the rows whose val ``accuracy`` is at most ``max_drop`` below ``teacher_val_acc`` (and
    ``feasible``, where that column exists), the one with the smallest ``by`` (the largest with
    ``largest=True``; ties go to the higher val accuracy). No test column is read: the member is
    what a user of the search would pick, and its test metrics are then reported as they are.

    Example:
        >>> import pandas as pd
        >>> f = pd.DataFrame({"accuracy": [0.95, 0.97], "size_bytes": [100, 200],
        ...                   "test_accuracy": [0.99, 0.90]})
        >>> int(val_chosen(f, 0.975)["size_bytes"])  # 0.95 is 2.5 points below on val
        200
    """
    if front is None or len(front) == 0:
        return None
    ok = front[front["accuracy"].astype(float) >= teacher_val_acc - max_drop - 1e-9]
    if "feasible" in ok:
        ok = ok[ok["feasible"].astype(bool)]
    if len(ok) == 0:
        return None
    ok = ok.sort_values(["accuracy"], ascending=False, kind="stable")
    ok = ok.sort_values([by], ascending=not largest, kind="stable")
    return ok.iloc[0]


def front_hv(pareto: Any, teacher_acc: float, teacher_bytes: float) -> float:
    """Hypervolume of a val-chosen front scored with its test accuracy (see module doc)."""
    if len(pareto) == 0 or "test_accuracy" not in pareto:
        return 0.0
    ref = hv_reference(teacher_acc, teacher_bytes)
    acc = pareto["test_accuracy"].astype(float).tolist()
    return hypervolume(acc, pareto["size_bytes"].astype(float).tolist(), ref)


def mean_spread(xs: Iterable[float]) -> str:
    """``mean ± sample std`` (``± 0`` for one value)."""
    xs = list(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.4f} ± {sd:.4f}"


# ----------------------------------------------------------------------------- spaces


def quality_space(task_name: str, model: Any, quick: bool = False) -> Any:
    """The search space used by the quality benchmarks (reported in the doc)."""
    from autocompress.spaces import CompressionSpace, FinetuneSettings, Knobs

    if task_name == "digits-mlp":
        knobs = Knobs(
            sparsity=(0.3, 0.97),
            sparsity_step=0.01,
            bits=(2, 3, 4, 5, 6, 8),
            schemes=("uniform", "codebook"),
            width=(0.1, 1.0),
            width_step=0.05,
        )
        ft = FinetuneSettings(epochs=40, patience=10)
    else:
        knobs = Knobs(
            sparsity=(0.3, 0.95),
            sparsity_step=0.05,
            bits=(2, 3, 4, 5, 6, 8),
            schemes=("uniform", "codebook"),
            width=(0.2, 1.0),
            width_step=0.05,
        )
        ft = FinetuneSettings(epochs=8 if quick else 20, patience=4)
    return CompressionSpace.from_model(model, knobs, finetune=ft)


def describe_knobs(space: Any) -> str:
    """One line naming the knobs and fine-tune settings of ``space``."""
    k, f = space.knobs, space.finetune
    return (
        f"per-layer sparsity {k.sparsity[0]}..{k.sparsity[1]} step {k.sparsity_step}, "
        f"bits {list(k.bits)}, schemes {list(k.schemes)}, global width "
        f"{k.width[0]}..{k.width[1]} step {k.width_step}; distillation fine-tune up to "
        f"{f.epochs} epochs (patience {f.patience}, lr {f.lr})"
    )


# ----------------------------------------------------------------------------- baselines


GRID_SPARSITY = (0.5, 0.6, 0.7, 0.8, 0.9)
GRID_BITS = (2, 3, 4, 8)
GRID_WIDTH = (0.2, 0.3, 0.5, 0.7, 1.0)


def uniform_grid(space: Any, budget: int) -> list[Any]:
    """Uniform plans (same knobs on every layer) over a sparsity x bits x width grid.

    The full grid has 5 x 4 x 5 = 100 plans; a smaller ``budget`` takes an evenly spaced subset
    (always including the corners of the grid's order), so it stays deterministic.
    """
    combos = list(itertools.product(GRID_SPARSITY, GRID_BITS, GRID_WIDTH))
    if budget < len(combos):
        idx = np.unique(np.linspace(0, len(combos) - 1, budget).round().astype(int))
        combos = [combos[i] for i in idx]
    return [space.uniform(sparsity=s, bits=b, width=w) for s, b, w in combos]


def stage1_space(space: Any) -> Any:
    """Sequential pipeline, stage 1: the same space with every layer kept at 32 bits."""
    from dataclasses import replace

    return replace(space, knobs=replace(space.knobs, bits=(32,), schemes=("uniform",)))


def fixed_structure(trials: Any, space: Any) -> dict[str, float]:
    """Sequential pipeline hand-off: the sparsities and width of stage 1's smallest feasible
    trial (or, if none is feasible, its most accurate one), as Optuna parameter values."""
    done = trials[trials["status"] == "COMPLETE"]
    feas = done[done["feasible"].astype(bool)]
    row = (
        feas.sort_values("size_bytes").iloc[0]
        if len(feas)
        else done.sort_values("accuracy").iloc[-1]
    )
    fixed = {f"{key}.sparsity": float(row[f"{key}.sparsity"]) for key in space.free_groups()}
    if space.knobs.width is not None:
        fixed["width"] = float(row["width"])
    return fixed


def partial_fixed_sampler(fixed: dict[str, float], seed: int, trials: int) -> Any:
    """The product's default sampler (TPE, its own settings) over the knobs not in ``fixed``."""
    import warnings

    import optuna

    from autocompress.search._searcher import make_sampler

    base = make_sampler("tpe", seed, trials)
    with warnings.catch_warnings():  # PartialFixedSampler is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.PartialFixedSampler(fixed, base)


# ----------------------------------------------------------------------------- running


def init_ray(cpus: int = 2) -> None:
    """Start one quiet local Ray for all searches of this process (saves ~4 s per search)."""
    import logging

    for k, v in {
        "RAY_AIR_NEW_OUTPUT": "0",
        "RAY_AUTH_MODE": "disabled",
        "TUNE_GLOBAL_CHECKPOINT_S": "1",
        "RAY_DEDUP_LOGS": "0",
    }.items():
        os.environ.setdefault(k, v)
    import ray

    if not ray.is_initialized():
        ray.init(  # "local": a private Ray, never another user's cluster on this machine
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )


def search(
    task: Any,
    space: Any,
    run_dir: Path,
    *,
    trials: int,
    sampler: Any = "tpe",
    seed: int = 0,
    baselines: list | None = None,
    warm_start: bool = False,
    workers: int = 2,
    trial_timeout: float | None = None,
    early_stop: Any = False,
) -> Any:
    """One product search (accuracy vs size, accuracy drop <= 1 point on val).

    ``warm_start``: the product's default opening (``search.run(baselines=None)``: uniform
    plans spread over the space); otherwise exactly ``baselines`` (none by default) run first.
    """
    import shutil

    from autocompress import search as ac_search
    from autocompress.objectives import Objective
    from autocompress.search import SearchResult

    if REUSE and (run_dir / "result.json").is_file():
        res = SearchResult.load(run_dir)
        if len(res.trials) == trials:
            log(f"reusing {run_dir}")
            return res

    shutil.rmtree(run_dir, ignore_errors=True)
    objective = Objective(["accuracy", "size_bytes"], constraints=["accuracy_drop <= 0.01"])
    return ac_search.run(
        task,
        space,
        objective,
        trials=trials,
        workers=workers,
        sampler=sampler,
        seed=seed,
        baselines=None if warm_start else (baselines or []),
        run_dir=run_dir,
        progress=False,
        trial_timeout=trial_timeout,
        early_stop=early_stop,
    )


def loadavg() -> str:
    """``os.getloadavg()`` formatted (1, 5, 15 minutes)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
