"""Matplotlib figures of a search: fronts, per-layer plans, hypervolume."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

KNOB = re.compile(r"^(?P<layer>.+)\.(?P<knob>sparsity|bits|rank_ratio|scheme)$")


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def front_plot(
    trials: pd.DataFrame,
    pareto: pd.DataFrame,
    x: str,
    y: str,
    path: Path,
    *,
    teacher: dict | None = None,
    logx: bool = True,
) -> Path | None:
    """Scatter of every complete trial (feasible filled, infeasible crosses), the front as a
    step line, the teacher as a star."""
    if x not in trials or y not in trials:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ok = trials[trials["status"] == "COMPLETE"] if "status" in trials else trials
    if "duplicate_of" in ok:  # a reused result is the same point as its original
        ok = ok[ok["duplicate_of"].fillna("") == ""]
    feas = ok["feasible"].astype(bool) if "feasible" in ok else pd.Series(True, index=ok.index)
    ax.scatter(ok[x][feas], ok[y][feas], s=14, c="#7a9cc6", label="feasible trials")
    ax.scatter(ok[x][~feas], ok[y][~feas], s=14, c="#d9a0a0", marker="x", label="infeasible")
    if len(pareto) and x in pareto and y in pareto:
        p = pareto.sort_values(x)
        ax.step(p[x], p[y], where="post", c="#1f4e8c", lw=1.5)
        ax.scatter(p[x], p[y], s=36, c="#1f4e8c", label="Pareto front (val)")
    if teacher and x in teacher and y in teacher:
        ax.scatter([teacher[x]], [teacher[y]], s=80, marker="*", c="#c47f00", label="teacher")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def layer_plan_plot(pareto: pd.DataFrame, path: Path) -> Path | None:
    """Heat map of per-layer bits (colour) with sparsity printed, one row per front member."""
    cols = [c for c in pareto.columns if (m := KNOB.match(c)) and m["knob"] == "bits"]
    if not len(pareto) or not cols:
        return None
    layers = [KNOB.match(c)["layer"] for c in cols]
    bits = pareto[cols].to_numpy(dtype=float, copy=True)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(layers), 1.0 + 0.4 * len(pareto)))
    im = ax.imshow(np.log2(bits), cmap="viridis", aspect="auto", vmin=1, vmax=5)
    for i in range(len(pareto)):
        for j, layer in enumerate(layers):
            sp = pareto.iloc[i].get(f"{layer}.sparsity", 0.0)
            ax.text(
                j,
                i,
                f"{int(bits[i, j])}b\n{float(sp):.0%}",
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    labels = [
        f"{t} (width {w:.2f})" if "width" in pareto else str(t)
        for t, w in zip(pareto["trial_id"], pareto.get("width", pareto["trial_id"]), strict=True)
    ]
    ax.set_yticks(range(len(pareto)), labels, fontsize=7)
    ax.set_title("front members: bits / sparsity per layer", fontsize=9)
    fig.colorbar(im, ax=ax, label="log2(bits)")
    return _save(fig, path)


def hypervolume_plot(history: pd.DataFrame, path: Path) -> Path | None:
    """Hypervolume of the feasible front after each finished trial."""
    if history is None or not len(history):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(history["n_trials"], history["hypervolume"], c="#1f4e8c", drawstyle="steps-post")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    return _save(fig, path)
