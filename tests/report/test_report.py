"""The report's content from a run directory: counts, tables, charts, formats, offline HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from reportkit import make_run

from autocompress.errors import AutocompressError
from autocompress.report import write_report
from autocompress.report._data import load_run
from autocompress.report._figures import knobs_figure, latency_figure, size_figure
from autocompress.search._tables import read_csv


def _figure_json(html: str, div_id: str) -> dict:
    """The figure plotly draws in ``div_id``: data and layout as embedded in the page."""
    m = re.search(rf'Plotly\.newPlot\(\s*"{div_id}",\s*(\[.*?\]),\s*(\{{.*?\}}),\s*\{{', html, re.S)
    assert m, f"no figure {div_id}"
    return {"data": json.loads(m.group(1)), "layout": json.loads(m.group(2))}


def test_counts_use_the_real_statuses(fake_run: Path) -> None:
    html = write_report(fake_run).read_text()
    # 12 run + 1 duplicate complete; 1 FAILED with a record, 1 crashed without one, 1 stopped
    assert '<p id="trial-count">13 complete, 2 failed, 1 stopped (1 reused' in html
    assert "16 trials" in html and "0 of" not in html


def test_size_chart_draws_every_trial_its_legend_lists(fake_run: Path) -> None:
    view = load_run(fake_run)
    fig = size_figure(view)
    by_name = {t.name.rsplit(" (", 1)[0]: t for t in fig.data}
    assert set(by_name) == {"infeasible", "feasible", "Pareto front (val)", "teacher"}
    drawn = sum(len(by_name[n].x) for n in ("infeasible", "feasible", "Pareto front (val)"))
    assert drawn == len(view.complete) == 12  # the duplicate is its original's point
    for name, trace in by_name.items():
        if name != "teacher":  # the legend's count is the number of points drawn
            assert trace.name.endswith(f"({len(trace.x)})")
    front = by_name["Pareto front (val)"]
    assert sorted(front.customdata[:, 0]) == sorted(view.pareto["trial_id"])
    assert fig.layout.xaxis.type == "log"
    assert all(re.fullmatch(r"[\d.]+ [kM]?B<br>[\d.,]+x", t) for t in fig.layout.xaxis.ticktext)


def test_hover_names_trial_ratio_metrics_and_plan(fake_run: Path) -> None:
    fig = size_figure(load_run(fake_run))
    front = next(t for t in fig.data if t.name.startswith("Pareto"))
    row = list(front.customdata[0])
    label = front.hovertemplate
    for i, value in enumerate(row):
        label = label.replace(f"%{{customdata[{i}]}}", str(value))
    assert row[0] in label and re.search(r"ratio [\d.]+x", label)
    assert re.search(r"val accuracy: \d\d\.\d\d%", label) and "test accuracy: " in label
    assert "layers" in label or "fc1" in label  # the plan summary


def test_front_table_is_readable(fake_run: Path) -> None:
    html = write_report(fake_run).read_text()
    table = html.split('<table class="sortable front">')[1].split("</table>")[0]
    heads = re.findall(r"<th(?: [^>]*)?>(.*?)</th>", table)
    assert heads == [
        "trial",
        "size (bytes)",
        "ratio",
        "accuracy val",
        "accuracy drop val",
        "accuracy test",
        "accuracy drop test",
        "plan",
    ]
    pareto = read_csv(fake_run / "pareto.csv")
    assert table.count("<tr class") == len(pareto)
    assert "plan_json" not in html and "{&quot;" not in table
    shown = " | ".join(re.findall(r">([^<]+)<", table))  # the text a reader sees
    assert not re.search(r"\d\.?\d*e[+-]\d\d", shown)  # no 1.404e+04
    big = int(pareto["size_bytes"].max())
    assert f"{big:,}" in table


def test_failures_are_listed_with_their_reasons(fake_run: Path) -> None:
    html = write_report(fake_run).read_text()
    failures = html.split("<h2>Failures</h2>")[1].split("<h2>")[0]
    assert "tfail" in failures and "RuntimeError: loss is nan at epoch 3" in failures
    assert "tcrash" in failures and "RayActorError: the worker died" in failures
    assert "tstop" in failures and "stopped before it finished" in failures
    assert "3 trial(s) did not finish" in failures


def test_knobs_and_progress(fake_run: Path) -> None:
    view = load_run(fake_run)
    fig = knobs_figure(view)
    heat = fig.data[0]
    assert list(heat.x) == ["fc1", "fc2", "fc3"] and len(heat.y) == len(view.pareto)
    assert all(re.fullmatch(r"\d+b( cb)?( \d+%)?", t) for row in heat.text for t in row)
    p = view.progress
    assert len(p) == 15  # COMPLETE and FAILED trials (not the STOPPED one)
    assert p["best_ratio"].is_monotonic_increasing
    assert p["best_ratio"].iloc[-1] == pytest.approx(view.pareto["compression_ratio"].max())


def test_latency_chart_only_when_latency_was_measured(tmp_path: Path) -> None:
    assert latency_figure(load_run(make_run(tmp_path / "a"))) is None
    view = load_run(make_run(tmp_path / "b", latency=True))
    fig = latency_figure(view)
    assert fig is not None and fig.layout.xaxis.title.text == "latency (ms)"
    assert sum(len(t.x) for t in fig.data if t.name != "teacher") == len(view.complete)
    html = write_report(tmp_path / "b").read_text()
    assert "chart-latency" in html


def test_report_is_self_contained_and_offline(fake_run: Path) -> None:
    html = write_report(fake_run).read_text()
    assert html.count("<script") >= 2 and "Plotly.newPlot" in html
    srcs = re.findall(r'<script[^>]*\bsrc=["\']([^"\']+)', html)
    assert srcs == []  # plotly.js is inlined: no CDN, no file next to the report
    assert not re.search(r'<link[^>]+href=["\']https?:', html)
    fig = _figure_json(html, "chart-size")
    assert len(fig["data"]) == 4
    for name in ("front_size", "layer_plans", "hypervolume"):
        assert (fake_run / "plots" / f"{name}.png").is_file()  # PNGs for slides and docs


def test_png_front_plot_draws_all_complete_trials(fake_run: Path) -> None:
    import matplotlib.image as mpimg

    from autocompress.report import front_plot

    view = load_run(fake_run)
    out = front_plot(view.trials, view.pareto, "size_bytes", "accuracy", fake_run / "f.png")
    assert out is not None and mpimg.imread(out).shape[2] in (3, 4)


def test_missing_run_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AutocompressError, match="run `autocompress run` first"):
        write_report(tmp_path / "nothing")
