"""A self-contained ``report.html`` (images embedded as base64, no external files)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from autocompress.errors import AutocompressError
from autocompress.report._plots import front_plot, hypervolume_plot, layer_plan_plot

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#eef}img{max-width:100%}.small{color:#666;font-size:12px}"""


def _img(path: Path | None) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def write_report(run_dir: str | Path) -> Path:
    """Write PNG plots and a self-contained ``report.html`` into ``run_dir``; return its path.

    Example:
        >>> write_report("no/such/run")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        autocompress.errors.AutocompressError: no finished search in 'no/such/run' ...
    """
    run = Path(run_dir)
    if not (run / "trials.csv").is_file():
        raise AutocompressError(
            f"no finished search in {str(run)!r} (trials.csv missing): run `autocompress run` first"
        )
    from autocompress.search import SearchResult

    res = SearchResult.load(run)
    trials, pareto, teacher = res.trials, res.pareto, dict(res.teacher)
    teacher_plot = {k.removeprefix("val_"): v for k, v in teacher.items()}
    pngs = run / "plots"
    pngs.mkdir(exist_ok=True)
    metric_cols = [c for c in ("accuracy", "size_bytes", "latency_ms") if c in trials]
    figs = [
        front_plot(
            trials, pareto, "size_bytes", "accuracy", pngs / "front_size.png", teacher=teacher_plot
        ),
        front_plot(
            trials,
            pareto,
            "latency_ms",
            "accuracy",
            pngs / "front_latency.png",
            teacher=teacher_plot,
        ),
        layer_plan_plot(pareto, pngs / "layer_plans.png"),
        hypervolume_plot(res.hypervolume_history(), pngs / "hypervolume.png"),
    ]
    n_ok = int((trials["status"] == "ok").sum()) if "status" in trials else len(trials)
    parts = [
        f"<html><head><meta charset='utf-8'><title>autocompress report</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>autocompress: {html.escape(str(run))}</h1>",
        f"<p>{n_ok} of {len(trials)} trials finished; front of {len(pareto)} models. "
        f"Teacher: <code>{html.escape(json.dumps(teacher))}</code></p>",
        "<h2>Pareto front</h2>",
        pareto.to_html(index=False, float_format=lambda v: f"{v:.4g}")
        if len(pareto)
        else f"<p>{html.escape(res.summary())}</p>",
        "<h2>Plots</h2>",
        *[_img(f) for f in figs],
        "<h2>All trials</h2>",
        trials.drop(columns=[c for c in trials if c.startswith("plan")], errors="ignore").to_html(
            index=False, float_format=lambda v: f"{v:.4g}"
        ),
        f"<p class='small'>metrics: {', '.join(metric_cols)}</p></body></html>",
    ]
    out = run / "report.html"
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out
