"""The command line, end to end: inspect, compress, run (subprocess: real Ray), report, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from autocompress import Task, load
from autocompress.cli import app
from autocompress.search._tables import read_csv

runner = CliRunner()
EXP = """\
task: digits-mlp
space:
  knobs: {sparsity: [0.5, 0.9], bits: [4, 8], width: [0.5, 1.0]}
finetune: {epochs: 2}
search: {trials: 4, workers: 2, early_stop: {after: 0.5, margin: 0.5}}
"""


def test_inspect_lists_layers_and_rejects_unknown_task() -> None:
    res = runner.invoke(app, ["inspect", "mnist1d-transformer"])
    assert res.exit_code == 0
    assert "blocks.0.ff1" in res.output and "not compressed: blocks.0.attn" in res.output
    bad = runner.invoke(app, ["inspect", "digits-mpl"])
    assert bad.exit_code == 2 and "unknown task 'digits-mpl'" in bad.output


def test_compress_writes_a_loadable_artifact(digits_mlp: Task, tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    args = ["compress", "digits-mlp", "--sparsity", "0.8", "--bits", "4", "--epochs", "2"]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "bytes" in res.output and "x)" in res.output
    model = load(out)
    x = digits_mlp.data("test").tensors[0][:8]
    assert model(x).shape == (8, 10)
    bad = runner.invoke(app, ["compress", "digits-mlp", "--bits", "9", "--out", str(out)])
    assert bad.exit_code == 2 and "bits=9" in bad.output


def test_run_report_export_from_the_command_line(digits_mlp: Task, tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXP)
    run_dir = tmp_path / "run"
    exe = Path(sys.executable).parent / "autocompress"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [str(exe), "run", str(exp), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "front" in out.stdout and (run_dir / "report.html").is_file()
    settings = json.loads((run_dir / "run.json").read_text())["settings"]
    assert settings["early_stop"] == {"after": 0.5, "margin": 0.5}  # YAML -> search.run
    pareto = read_csv(run_dir / "pareto.csv")
    assert len(pareto) >= 1
    trial = str(pareto["trial_id"].iloc[0])
    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0 and "report.html" in res.output
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64" in html and trial in html
    dest = tmp_path / "exported"
    res = runner.invoke(app, ["export", str(run_dir), "--trial", trial, "--out", str(dest)])
    assert res.exit_code == 0, res.output
    x = digits_mlp.data("val").tensors[0]
    acc = float((load(dest)(x).argmax(1) == digits_mlp.data("val").tensors[1]).float().mean())
    assert abs(acc - float(pareto["accuracy"].iloc[0])) < 1e-6
    # a second run into the same directory is refused, nothing saved is lost
    again = subprocess.run(
        [str(exe), "run", str(exp), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert again.returncode != 0 and "resume" in again.stderr
    assert (run_dir / "pareto.csv").is_file()


def test_bad_experiment_fails_fast_before_ray(tmp_path: Path) -> None:
    exp = tmp_path / "bad.yaml"
    exp.write_text("task: digits-mlp\nsearch: {sampler: nsgaa}\n")
    t0 = time.monotonic()
    res = runner.invoke(app, ["run", str(exp), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "search.sampler" in res.output and "nsgaa" in res.output
    assert time.monotonic() - t0 < 2.0
    assert not (tmp_path / "r").exists()


def test_tasks_lists_builtins() -> None:
    res = runner.invoke(app, ["tasks", "--no-train"])
    assert res.exit_code == 0
    for name in ("digits-mlp", "digits-cnn", "mnist1d-cnn", "mnist1d-transformer"):
        assert name in res.output


def test_loaded_model_is_plain_torch(tmp_path: Path, digits_mlp: Task) -> None:
    res = runner.invoke(
        app,
        ["compress", "digits-mlp", "--bits", "8", "--epochs", "0", "--out", str(tmp_path / "a")],
    )
    assert res.exit_code == 0, res.output
    assert isinstance(load(tmp_path / "a"), torch.nn.Module)
