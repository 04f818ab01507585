"""Interactive plotly figures of a run: the front, latency, search progress, per-layer knobs.

Every point carries its trial id, ratio, metrics and a plan summary in its hover label. The
figures are turned into HTML by ``_html`` with plotly.js embedded once (the report works
offline).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from autocompress.report._data import RunView
from autocompress.report._format import (
    fmt_bytes_short,
    fmt_metric,
    fmt_ratio,
    is_fraction_metric,
    layer_token,
    metric_label,
    plan_layers,
    plan_summary,
)

COLORS = {
    "feasible": "#7a9cc6",
    "infeasible": "#e0a3a3",
    "front": "#1f4e8c",
    "teacher": "#d48a00",
    "failed": "#b03030",
}
_LAYOUT = dict(
    template="plotly_white",
    margin=dict(l=60, r=20, t=50, b=60),
    legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
    hoverlabel=dict(align="left"),
    font=dict(family="system-ui, -apple-system, Segoe UI, sans-serif", size=13),
)


def _hover(view: RunView, rows: pd.DataFrame, label: str) -> tuple[np.ndarray, str]:
    """customdata and a hovertemplate: trial id, ratio, the objective's metrics, plan."""
    names = [view.metric, *[n for n in view.names if n != view.metric]]
    names += [n for n in ("size_bytes", f"{view.metric}_drop") if n not in names]
    names = [n for n in names if n in rows]
    cols = [rows["trial_id"].astype(str)]
    cols.append(rows["compression_ratio"].map(fmt_ratio) if "compression_ratio" in rows else "")
    cols += [rows[n].map(lambda v, n=n: fmt_metric(n, v)) for n in names]
    test = f"test_{view.metric}"
    cols.append(rows[test].map(lambda v: fmt_metric(test, v)) if test in rows else "")
    cols.append(rows["plan_json"].map(plan_summary) if "plan_json" in rows else "")
    data = np.column_stack(
        [np.asarray(c if isinstance(c, pd.Series) else [c] * len(rows)) for c in cols]
    )
    lines = [f"<b>{label} %{{customdata[0]}}</b>", "ratio %{customdata[1]}"]
    val = (view.metric, f"{view.metric}_drop")  # the others are not measured per split
    lines += [
        f"{'val ' if n in val else ''}{metric_label(n)}: %{{customdata[{i + 2}]}}"
        for i, n in enumerate(names)
    ]
    if test in rows:
        lines.append(f"test {view.metric}: %{{customdata[{len(names) + 2}]}}")
    lines.append(f"%{{customdata[{len(names) + 3}]}}")
    return data, "<br>".join(lines) + "<extra></extra>"


def _points(
    fig: go.Figure, view: RunView, rows: pd.DataFrame, x: str, name: str, **kw: Any
) -> None:
    rows = rows[np.isfinite(pd.to_numeric(rows[x], errors="coerce"))]
    if not len(rows):  # no empty legend entries
        return
    data, tmpl = _hover(view, rows, kw.pop("label", "trial"))
    fig.add_trace(
        go.Scatter(
            x=rows[x].astype(float),
            y=rows[view.metric].astype(float),
            name=f"{name} ({len(rows)})",
            customdata=data,
            hovertemplate=tmpl,
            **kw,
        )
    )


def _size_ticks(lo: float, hi: float, ref: float) -> tuple[list[float], list[str]]:
    """1-2-5 ticks between lo and hi, labelled with bytes and the ratio to ``ref``."""
    vals = [
        m * 10.0**e
        for e in range(int(math.floor(math.log10(lo))), int(math.ceil(math.log10(hi))) + 1)
        for m in (1, 2, 5)
    ]
    vals = [v for v in vals if lo <= v <= hi] or [lo, hi]
    return vals, [f"{fmt_bytes_short(v)}<br>{fmt_ratio(ref / v)}" for v in vals]


def _metric_axis(fig: go.Figure, view: RunView, **kw: Any) -> None:
    fmt = ".1%" if is_fraction_metric(view.metric) else None
    fig.update_yaxes(title_text=f"{metric_label(view.metric)} (val)", tickformat=fmt, **kw)


def _trial_scatter(fig: go.Figure, view: RunView, x: str, front_line: bool) -> None:
    done = view.complete
    front_ids = set(view.pareto["trial_id"].astype(str)) if len(view.pareto) else set()
    is_front = done["trial_id"].astype(str).isin(front_ids)
    feas = done["feasible"].astype(bool)
    _points(
        fig,
        view,
        done[~feas],
        x,
        "infeasible",
        mode="markers",
        marker=dict(symbol="x", size=8, color=COLORS["infeasible"]),
    )
    _points(
        fig,
        view,
        done[feas & ~is_front],
        x,
        "feasible",
        mode="markers",
        marker=dict(size=8, color=COLORS["feasible"], line=dict(width=0.5, color="white")),
    )
    front = view.pareto.sort_values(x) if x in view.pareto else view.pareto.iloc[:0]
    _points(
        fig,
        view,
        front,
        x,
        "Pareto front (val)",
        label="front member",
        mode="lines+markers" if front_line else "markers",
        line=dict(shape="hv", color=COLORS["front"], width=2),
        marker=dict(size=12, color=COLORS["front"], line=dict(width=1, color="white")),
    )


def _teacher(fig: go.Figure, view: RunView, x: float, xname: str) -> None:
    y = view.teacher_metric()
    if not (math.isfinite(x) and math.isfinite(y)):
        return
    fig.add_trace(
        go.Scatter(
            x=[x],
            y=[y],
            name="teacher",
            mode="markers",
            marker=dict(symbol="star", size=18, color=COLORS["teacher"]),
            hovertemplate=(
                f"<b>teacher</b><br>{xname}: {fmt_metric(xname, x)}<br>"
                f"{view.metric}: {fmt_metric(view.metric, y)} val, "
                f"{fmt_metric(view.metric, view.teacher_metric('test'))} test<extra></extra>"
            ),
        )
    )
    limit = view.drop_limit()
    if limit is not None:
        fig.add_hline(
            y=y - limit,
            line=dict(dash="dot", color="#888", width=1),
            annotation_text=f"{view.metric}_drop ≤ {fmt_metric(f'{view.metric}_drop', limit)}",
            annotation_position="bottom right",
            annotation_font_color="#666",
        )


def size_figure(view: RunView) -> go.Figure | None:
    """Accuracy vs artifact size of every complete trial, the front and the teacher."""
    if "size_bytes" not in view.trials or view.metric not in view.trials:
        return None
    fig = go.Figure()
    _trial_scatter(fig, view, "size_bytes", front_line="size_bytes" in view.names)
    _teacher(fig, view, view.teacher_size, "size_bytes")
    sizes = pd.to_numeric(view.complete["size_bytes"], errors="coerce").dropna().tolist()
    sizes = [s for s in [*sizes, view.teacher_size] if math.isfinite(s) and s > 0]
    if sizes:
        lo, hi = min(sizes) / 1.3, max(sizes) * 1.3
        vals, text = _size_ticks(lo, hi, view.teacher_size)
        fig.update_xaxes(
            type="log",
            range=[math.log10(lo), math.log10(hi)],
            tickvals=vals,
            ticktext=text,
        )
    fig.update_xaxes(title_text="artifact size on disk (bytes, log scale) and compression ratio")
    _metric_axis(fig, view)
    fig.update_layout(height=520, **_LAYOUT)
    return fig


def latency_figure(view: RunView) -> go.Figure | None:
    """Accuracy vs measured latency, when the run measured one."""
    col = view.latency_column()
    if col is None or view.metric not in view.trials:
        return None
    fig = go.Figure()
    _trial_scatter(fig, view, col, front_line=col in view.names)
    if "teacher_latency_ms" in view.trials:
        t = pd.to_numeric(view.complete["teacher_latency_ms"], errors="coerce").median()
        _teacher(fig, view, float(t), col)
    fig.update_xaxes(title_text=metric_label(col))
    _metric_axis(fig, view)
    fig.update_layout(height=460, **_LAYOUT)
    return fig


def progress_figure(view: RunView) -> go.Figure | None:
    """Hypervolume of the feasible front and the best feasible ratio after each trial."""
    p = view.progress
    if not len(p):
        return None
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("hypervolume of the feasible front", "best feasible compression ratio"),
        horizontal_spacing=0.12,
    )
    ids = p["trial_id"].astype(str)
    fig.add_trace(
        go.Scatter(
            x=p["n_trials"],
            y=p["hypervolume"],
            mode="lines",
            line=dict(shape="hv", color=COLORS["front"], width=2),
            name="hypervolume",
            customdata=ids,
            hovertemplate="after %{x} trials (%{customdata})<br>hypervolume %{y:.3f}"
            "<extra></extra>",
        ),
        row=1,
        col=1,
    )
    ratio = [fmt_ratio(v) for v in p["best_ratio"]]
    fig.add_trace(
        go.Scatter(
            x=p["n_trials"],
            y=p["best_ratio"],
            mode="lines",
            line=dict(shape="hv", color=COLORS["teacher"], width=2),
            name="best feasible ratio",
            customdata=np.column_stack([ids, ratio]),
            hovertemplate="after %{x} trials (%{customdata[0]})<br>best %{customdata[1]}"
            "<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="finished trials")
    fig.update_yaxes(title_text="hypervolume", row=1, col=1)
    fig.update_yaxes(title_text="compression ratio (x)", row=1, col=2)
    fig.update_layout(height=340, showlegend=False, **_LAYOUT)
    return fig


def knobs_figure(view: RunView) -> go.Figure | None:
    """Per-layer knobs of each front member: colour = bits, text = bits/scheme/sparsity/rank."""
    front = view.pareto.sort_values("size_bytes") if "size_bytes" in view.pareto else view.pareto
    if not len(front) or "plan_json" not in front:
        return None
    plans = [plan_layers(p) for p in front["plan_json"]]
    layers = list(view.layers) or list(dict.fromkeys(n for layers, _ in plans for n in layers))
    if not layers:
        return None
    z, text, hover = [], [], []
    for (lp, _width), tid in zip(plans, front["trial_id"].astype(str), strict=True):
        knobs = [lp.get(name, {}) for name in layers]
        z.append([math.log2(int(k.get("bits", 32))) for k in knobs])
        text.append([layer_token(k) for k in knobs])
        hover.append(
            [
                f"<b>{tid}</b> · {name}<br>{int(k.get('bits', 32))} bits "
                f"{k.get('scheme', 'uniform')}<br>sparsity {float(k.get('sparsity', 0.0)):.0%}"
                f"<br>rank ratio {float(k.get('rank_ratio', 1.0)):.2f}"
                for name, k in zip(layers, knobs, strict=True)
            ]
        )
    ylabels = [
        f"{tid} · {fmt_ratio(r)} · w{w:.2f}"
        for tid, r, (_, w) in zip(
            front["trial_id"].astype(str),
            front.get("compression_ratio", np.nan),
            plans,
            strict=True,
        )
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=layers,
            y=ylabels,
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale="Viridis",
            zmin=1,
            zmax=5,
            colorbar=dict(
                title=dict(text="bits"),
                tickvals=[1, 2, 3, 4, 5],
                ticktext=["2", "4", "8", "16", "32"],
            ),
            xgap=2,
            ygap=2,
        )
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", side="top")
    fig.update_layout(
        height=max(220, 90 + 34 * len(front)),
        **{**_LAYOUT, "margin": dict(l=200, r=20, t=60, b=20)},
    )
    return fig
