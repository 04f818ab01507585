"""A self-contained, offline ``report.html``: plotly.js embedded once, no external files.

Sections: summary tiles (teacher, trials, front), accuracy vs size (and vs latency when it was
measured) with every trial, the front as a table, per-layer knobs of the front, search progress,
failures with their reasons, and every trial in a sortable table. The matplotlib PNGs of
``plots/`` stay as files (slides, docs) and are the ``<noscript>`` fallback of the charts.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from autocompress.report import _figures as figs
from autocompress.report._data import RunView, load_run
from autocompress.report._format import (
    fmt_bytes,
    fmt_metric,
    fmt_num,
    fmt_ratio,
    metric_label,
    plan_summary,
)
from autocompress.report._plots import front_plot, hypervolume_plot, layer_plan_plot

_CSS = """
:root{--fg:#1d2433;--muted:#667085;--line:#e4e7ec;--accent:#1f4e8c;--bad:#b03030}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:var(--fg);
 background:#f6f7f9;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 8px}
.sub{color:var(--muted);margin:0 0 18px;font-size:14px}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:14px}
.tile{background:#fff;border:1px solid var(--line);border-radius:10px;padding:14px 16px}
.tile h3{margin:0 0 6px;font-size:13px;text-transform:uppercase;letter-spacing:.05em;
 color:var(--muted)}
.big{font-size:26px;font-weight:650}.tile p{margin:2px 0;font-size:14px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:10px 14px}
.note{color:var(--muted);font-size:13px;margin:6px 0}
table{border-collapse:collapse;width:100%;font-size:13.5px;background:#fff}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f0f3f8;font-weight:600;position:sticky;top:0;cursor:pointer;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.plan{font-family:ui-monospace,Menlo,monospace;font-size:12.5px;min-width:220px}
td.plan span{white-space:nowrap}
tr.infeasible td{color:#8a5a5a}tr.FAILED td,tr.STOPPED td{color:var(--bad)}
.scroll{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:10px}
details summary{cursor:pointer;font-weight:600;margin:8px 0}
.ok{color:#2a7a3a}.reason{font-family:ui-monospace,Menlo,monospace;font-size:12px;
 white-space:pre-wrap;word-break:break-word}
"""

# Click a column header to sort its table (numbers by their data-v value).
_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(th => th.addEventListener('click',
 () => { const i = th.cellIndex, tb = th.closest('table').tBodies[0], rows = [...tb.rows];
  const dir = th.dataset.dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
  const key = r => { const c = r.cells[i], v = c.dataset.v;
   return v !== undefined ? parseFloat(v)
   : c.classList.contains('n') ? Infinity : c.textContent; };
  rows.sort((a, b) => { const x = key(a), y = key(b);
   const o = typeof x === 'number' ? x - y : String(x).localeCompare(String(y));
   return dir === 'asc' ? o : -o; });
  rows.forEach(r => tb.appendChild(r)); }));
"""


def _esc(x: object) -> str:
    return html.escape(str(x))


def _plan_cell(plan_json: object) -> str:
    """A plan summary that wraps between layers, never inside one."""
    return " · ".join(f"<span>{_esc(t)}</span>" for t in plan_summary(plan_json).split(" · "))


def _cell(name: str, value: object) -> str:
    """A table cell: numbers right-aligned, formatted by metric, raw value kept for sorting."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"<td>{_esc(value)}</td>"
    raw = "" if v != v else f' data-v="{v!r}"'
    return f'<td class="n"{raw}>{_esc(fmt_metric(name, v))}</td>'


def _table(
    df: pd.DataFrame, columns: Sequence[tuple[str, str]], cls: str = "", row_cls: str = ""
) -> str:
    """An HTML table of ``df``'s ``(column, title)`` pairs; plan_json becomes a plan summary."""
    heads = []
    for col, title in columns:
        num = col not in ("trial_id", "status", "plan_json", "reason")
        heads.append(f"<th{' class=n' if num else ''}>{_esc(title)}</th>")
    body = []
    for _, r in df.iterrows():
        cells = []
        for col, _title in columns:
            v = r.get(col, "")
            if col == "plan_json":
                cells.append(f'<td class="plan">{_plan_cell(v)}</td>')
            elif col == "feasible":
                cells.append(f"<td>{'yes' if bool(v) else 'no'}</td>")
            elif col in ("trial_id", "status"):
                cells.append(f"<td>{_esc(v)}</td>")
            else:
                cells.append(_cell(col, v))
        klass = " ".join(
            c
            for c in (
                str(r.get("status", "")),
                "" if bool(r.get("feasible", True)) else "infeasible",
                row_cls,
            )
            if c
        )
        body.append(f'<tr class="{klass}">{"".join(cells)}</tr>')
    return (
        f'<table class="sortable {cls}"><thead><tr>{"".join(heads)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _metric_columns(view: RunView, df: pd.DataFrame, test: bool) -> list[tuple[str, str]]:
    """Val and (optionally) test columns of the task metric, its drop and the other objectives."""
    m = view.metric
    cols = [("size_bytes", "size (bytes)"), ("compression_ratio", "ratio")]
    cols += [(m, f"{m} val"), (f"{m}_drop", f"{m} drop val")]
    if test:
        cols += [(f"test_{m}", f"{m} test"), (f"test_{m}_drop", f"{m} drop test")]
    for n in view.names:
        if n not in (m, "size_bytes", "compression_ratio"):
            cols.append((n, f"{metric_label(n)} val"))
            if test:
                cols.append((f"test_{n}", f"{metric_label(n)} test"))
    return [(c, t) for c, t in cols if c in df]


def _tiles(view: RunView) -> str:
    m, t = view.metric, view.trials
    n, n_ok, n_fail = len(t), view.count("COMPLETE"), view.count("FAILED")
    n_stop = view.count("STOPPED")
    cons = "; ".join(view.objective.get("constraints", [])) or "no constraints"
    stopped = f", {n_stop} stopped" if n_stop else ""
    dup = view.n_duplicates
    dups = f" ({dup} reused an identical plan's result)" if dup else ""
    teacher = (
        f'<div class="tile"><h3>Teacher · {_esc(view.task)}</h3>'
        f'<div class="big">{fmt_bytes(view.teacher_size)} bytes</div>'
        f"<p>{_esc(m)}: <b>{fmt_metric(m, view.teacher_metric('val'))}</b> val · "
        f"<b>{fmt_metric(m, view.teacher_metric('test'))}</b> test</p>"
        f'<p class="note">the reference of every ratio: its artifact, exported the same way</p>'
        "</div>"
    )
    trials = (
        f'<div class="tile"><h3>Trials</h3><div class="big">{n} trials</div>'
        f'<p id="trial-count">{n_ok} complete, {n_fail} failed{stopped}{_esc(dups)}</p>'
        f"<p>{view.n_feasible} feasible ({_esc(cons)})</p>"
        "</div>"
    )
    p = view.pareto
    if len(p) and "compression_ratio" in p:
        best = p.loc[pd.to_numeric(p["compression_ratio"], errors="coerce").idxmax()]
        test_m = f"test_{m}"
        front = (
            f'<div class="tile"><h3>Front · {len(p)} models</h3>'
            f'<div class="big">{fmt_ratio(best["compression_ratio"])} smallest</div>'
            f"<p>trial {_esc(best['trial_id'])}: {fmt_bytes(best.get('size_bytes'))} bytes, "
            f"{_esc(m)} <b>{fmt_metric(m, best.get(m))}</b> val · "
            f"<b>{fmt_metric(m, best.get(test_m))}</b> test</p>"
            f'<p class="note">chosen on val; test is measured on the reloaded artifact</p></div>'
        )
    else:
        msg = view.info.get("message") or "no feasible trial"
        front = f'<div class="tile"><h3>Front · 0 models</h3><p>{_esc(msg)}</p></div>'
    return f'<div class="tiles">{teacher}{trials}{front}</div>'


def _failures(view: RunView) -> str:
    f = view.failures
    if not len(f):
        return '<p class="ok">No trial failed.</p>'
    by_reason = f["reason"].fillna("").astype(str).str.strip().str.split("\n").str[-1]
    rows = "".join(
        f"<tr class='{_esc(r['status'])}'><td>{_esc(r['trial_id'])}</td><td>{_esc(r['status'])}"
        f"</td><td class='plan'>{_plan_cell(r.get('plan_json'))}</td>"
        f"<td><details><summary class='reason'>{_esc(short[:160])}</summary>"
        f"<div class='reason'>{_esc(r['reason'])}</div></details></td></tr>"
        for (_, r), short in zip(f.iterrows(), by_reason, strict=True)
    )
    return (
        f"<p>{len(f)} trial(s) did not finish; they never enter the front.</p>"
        f'<div class="scroll"><table><thead><tr><th>trial</th><th>status</th><th>plan</th>'
        f"<th>reason (click for the full text)</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _settings(view: RunView) -> str:
    s = view.info.get("settings", {})
    obj = ", ".join(f"{m['direction']} {m['name']}" for m in view.objective.get("metrics", []))
    keys = ("sampler", "seed", "trials", "workers", "time_budget", "trial_timeout")
    items = [f"{k} {_esc(s[k])}" for k in keys if s.get(k) is not None]
    wall = view.info.get("wall_time_s")
    if wall is not None:
        items.append(f"wall time {fmt_num(float(wall))} s")
    return (
        f'<p class="note">objective: {_esc(obj)} · {" · ".join(items)} · files: trials.csv, '
        f"pareto.csv, result.json, plots/*.png · written {time.strftime('%Y-%m-%d %H:%M')}</p>"
    )


def _png(path: Path | None) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<noscript><img alt="{path.stem}" src="data:image/png;base64,{data}"></noscript>'


def _chart(fig, div_id: str, first: list[bool], png: Path | None = None) -> str:  # noqa: ANN001
    if fig is None:
        return '<p class="note">Nothing to draw: no trial has these values.</p>'
    out = fig.to_html(
        full_html=False,
        include_plotlyjs=first[0],
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )
    first[0] = False
    return f'<div class="card">{out}{_png(png)}</div>'


def render(view: RunView, pngs: dict[str, Path | None]) -> str:
    """The report's HTML for ``view`` (plotly.js inlined in the first chart)."""
    m, p = view.metric, view.pareto
    js = [True]
    front_p = p.sort_values("size_bytes") if "size_bytes" in p else p
    front_cols = [("trial_id", "trial"), *_metric_columns(view, p, test=True)]
    front_cols.append(("plan_json", "plan"))
    trial_cols = [("trial_id", "trial"), ("status", "status"), ("feasible", "feasible")]
    trial_cols += _metric_columns(view, view.trials, test=False)
    trial_cols += [(c, t) for c, t in (("duration_s", "time (s)"), ("plan_json", "plan"))]
    trial_cols = [(c, t) for c, t in trial_cols if c in view.trials]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>autocompress report · {_esc(view.task)}</title><style>{_CSS}</style></head>",
        "<body><main>",
        f"<h1>autocompress report · {_esc(view.task)}</h1>",
        f'<p class="sub">{_esc(view.run_dir)} · objective measured on val, front checked on '
        "test · hover a point for its trial, click a table header to sort</p>",
        _tiles(view),
        f"<h2>{_esc(metric_label(m)).capitalize()} vs size: every trial</h2>",
        '<p class="note">Log size axis; the ratio under each size is relative to the teacher. '
        "Failed trials have no metrics and are listed under Failures.</p>",
        _chart(figs.size_figure(view), "chart-size", js, pngs.get("front_size")),
    ]
    lat = figs.latency_figure(view)
    if lat is not None:
        parts += [
            f"<h2>{_esc(metric_label(m)).capitalize()} vs latency</h2>",
            _chart(lat, "chart-latency", js, pngs.get("front_latency")),
        ]
    parts += [
        f"<h2>Pareto front · {len(p)} models</h2>",
        '<div class="scroll">' + _table(front_p, front_cols, "front") + "</div>"
        if len(p)
        else f"<p>{_esc(view.info.get('message') or 'No feasible trial.')}</p>",
        "<h2>Per-layer knobs of the front</h2>",
        '<p class="note">bits (colour; cb = codebook), sparsity and low-rank ratio of every '
        "layer; w = width multiplier.</p>",
        _chart(figs.knobs_figure(view), "chart-knobs", js, pngs.get("layer_plans")),
        "<h2>Search progress</h2>",
        _chart(figs.progress_figure(view), "chart-progress", js, pngs.get("hypervolume")),
        "<h2>Failures</h2>",
        _failures(view),
        "<h2>All trials</h2>",
        f"<details><summary>{len(view.trials)} trials in finish order (click to open)</summary>",
        '<div class="scroll">' + _table(view.trials, trial_cols, "trials") + "</div></details>",
        _settings(view),
        f"<script>{_SORT_JS}</script></main></body></html>",
    ]
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write PNG plots and a self-contained, offline ``report.html`` into ``run_dir``.

    Returns the report's path. The HTML embeds plotly.js and every figure, so it opens
    anywhere, without a network.

    Example:
        >>> write_report("no/such/run")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        autocompress.errors.AutocompressError: no finished search in 'no/such/run' ...
    """
    view = load_run(run_dir)
    run, t, p = view.run_dir, view.trials, view.pareto
    out_dir = run / "plots"
    out_dir.mkdir(exist_ok=True)
    teacher = {"size_bytes": view.teacher_size, view.metric: view.teacher_metric()}
    lat = view.latency_column()
    pngs = {
        "front_size": front_plot(
            t, p, "size_bytes", view.metric, out_dir / "front_size.png", teacher=teacher
        ),
        "front_latency": front_plot(t, p, lat, view.metric, out_dir / "front_latency.png")
        if lat
        else None,
        "layer_plans": layer_plan_plot(p, out_dir / "layer_plans.png"),
        "hypervolume": hypervolume_plot(view.progress, out_dir / "hypervolume.png"),
    }
    out = run / "report.html"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(render(view, pngs), encoding="utf-8")
    tmp.replace(out)
    return out
