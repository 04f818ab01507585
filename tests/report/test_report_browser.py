"""The report of a real small search, opened in headless Chromium: what a user sees.

Chromium is Debian's ``chromium`` package (CI installs it: ``.ci/run``); Playwright drives it
through ``executable_path`` (no browser download). Skipped only when Chromium is absent. Run it
with ``make test-slow`` or ``pytest -m slow tests/report``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from raykit import private_ray

from autocompress import FinetuneSettings, Task
from autocompress.objectives import Metric, Objective
from autocompress.report import write_report
from autocompress.search import run
from autocompress.search._tables import read_csv
from autocompress.spaces import CompressionSpace, Knobs

HERE = Path(__file__).resolve().parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# slow: a real search (Ray, 8 trials) before the browser opens; it backs the promise that the
# report works in a browser, so CI runs it (`make test-slow`).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed: apt-get install -y chromium (CI installs it: .ci/run)",
    ),
]


def fragile(model, artifact, task) -> float:
    """0.0, but raises for 2-bit plans: a real trial failure with a reason (run by Ray workers)."""
    plan = json.loads((Path(artifact.path) / "plan.json").read_text())
    if plan["layers"]["fc1"]["bits"] == 2:
        raise RuntimeError("fragile metric refuses 2-bit layers")
    return 0.0


@pytest.fixture(scope="module")
def real_run(digits_mlp: Task, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 trials of a real search on digits-mlp (2 workers, 2-epoch fine-tunes), one of them
    failing, and its report."""
    knobs = Knobs(sparsity=(0.5, 0.95), bits=(2, 4, 6, 8), width=(0.5, 1.0))
    space = CompressionSpace.from_model(
        digits_mlp.teacher(), knobs, finetune=FinetuneSettings(epochs=2)
    )
    objective = Objective(
        ["accuracy", "size_bytes", Metric("fragile", "minimize", fragile)],
        ["accuracy_drop <= 0.02"],
    )
    base = [space.uniform(sparsity=s, bits=b) for s, b in ((0.5, 8), (0.9, 2), (0.8, 4))]
    run_dir = tmp_path_factory.mktemp("browser") / "run"
    with private_ray(HERE):  # workers import this module for `fragile`
        run(
            digits_mlp,
            space,
            objective,
            trials=8,
            workers=2,
            sampler="random",
            baselines=base,
            run_dir=run_dir,
            progress=False,
        )
    write_report(run_dir)
    return run_dir


def _legend_counts(page, div: str) -> dict[str, int]:
    texts = page.locator(f"#{div} .legend .traces .legendtext").all_text_contents()
    return {m[1]: int(m[2]) for t in texts if (m := re.fullmatch(r"(.+) \((\d+)\)", t))}


def test_report_renders_in_chromium(real_run: Path) -> None:
    from playwright.sync_api import sync_playwright

    trials = read_csv(real_run / "trials.csv")
    pareto = read_csv(real_run / "pareto.csv")
    done = trials[(trials["status"] == "COMPLETE") & (trials["duplicate_of"] == "")]
    n_failed = int((trials["status"] == "FAILED").sum())
    assert n_failed >= 1 and len(pareto) >= 1  # the run has something to show in each section
    errors: list[str] = []
    remote: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def no_network(route) -> None:  # the report must work offline
                remote.append(route.request.url)
                route.abort()

            page.route(re.compile(r"^https?://"), no_network)
            page.goto((real_run / "report.html").as_uri())
            page.wait_for_selector("#chart-size .scatterlayer .point", timeout=30_000)

            # the chart draws every trial its legend lists, and the teacher
            legend = _legend_counts(page, "chart-size")
            assert sum(legend.values()) == len(done)
            assert legend.get("Pareto front (val)") == len(pareto)
            points = page.locator("#chart-size .scatterlayer .trace")
            per_trace = [t.locator(".point").count() for t in points.all()]
            assert per_trace == [*legend.values(), 1]  # in legend order, then the teacher's star

            # hovering a front point names its trial, ratio and test accuracy
            front_pts = points.nth(list(legend).index("Pareto front (val)")).locator(".point")
            box = front_pts.first.bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            hover = page.locator("#chart-size .hoverlayer .hovertext").first
            hover.wait_for(timeout=10_000)
            text = hover.text_content() or ""
            assert re.search(r"front member [0-9a-f]{8}", text) and "test accuracy" in text
            assert re.search(r"ratio [\d.]+x", text)

            # the trial count and the front table as a reader sees them
            n_ok = int((trials["status"] == "COMPLETE").sum())
            count = page.locator("#trial-count").inner_text()
            assert count.startswith(f"{n_ok} complete, {n_failed} failed")
            rows = page.locator("table.front tbody tr")
            assert rows.count() == len(pareto)
            assert all(rows.nth(i).is_visible() for i in range(rows.count()))
            test_head = page.locator("table.front th", has_text="accuracy test").first
            right = test_head.bounding_box()
            assert right is not None and right["x"] + right["width"] <= 1280  # on screen
            first_row = rows.first.inner_text()
            assert str(pareto.sort_values("size_bytes")["trial_id"].iloc[0]) in first_row
            assert "e+0" not in page.locator("table.front").inner_text()

            # per-layer knobs, progress, failures with their reasons
            assert page.locator("#chart-knobs .heatmaplayer image, #chart-knobs .hm").count()
            assert page.locator("#chart-progress .scatterlayer .trace").count() == 2
            failures = page.locator("h2:has-text('Failures') + p + div table").inner_text()
            assert "fragile metric refuses 2-bit layers" in failures

            # every trial behind one click, sortable
            page.locator("details summary", has_text="trials in finish order").click()
            all_rows = page.locator("table.trials tbody tr")
            assert all_rows.count() == len(trials) and all_rows.first.is_visible()
            page.locator("table.trials th", has_text="size (bytes)").click()
            sizes = [
                float(v)
                for v in page.locator("table.trials tbody tr td:nth-child(4)").evaluate_all(
                    "cells => cells.map(c => c.dataset.v).filter(v => v !== undefined)"
                )
            ]
            assert sizes == sorted(sizes) and len(sizes) == n_ok

            shot = real_run / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == [] and remote == []
    assert shot.stat().st_size > 50_000  # a real picture, not a blank page
    print(f"\nscreenshot of the report: {shot}")
