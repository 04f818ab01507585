"""The command line, end to end: inspect, compress, run (subprocess: real Ray), report, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    # the trials command lists the ids export takes; an unknown id points to it
    listed = runner.invoke(app, ["trials", str(run_dir)])
    assert listed.exit_code == 0 and trial in listed.output and "COMPLETE" in listed.output
    res = runner.invoke(app, ["export", str(run_dir), "--trial", "nope", "--out", str(dest)])
    assert res.exit_code == 2 and f"autocompress trials {run_dir}" in res.output, res.output
    assert "result.trials" not in res.output  # Python, not the command line
    # a corrupt artifact (one flipped byte) is refused and nothing is copied
    weights = run_dir / "pareto" / trial / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    bad = tmp_path / "corrupt"
    res = runner.invoke(app, ["export", str(run_dir), "--trial", trial, "--out", str(bad)])
    assert res.exit_code == 2 and "sha256" in res.output and "nothing was copied" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not bad.exists()
    assert not list(tmp_path.glob(".corrupt*"))  # no partial copy either


def test_bad_experiment_fails_fast_before_ray(tmp_path: Path) -> None:
    exp = tmp_path / "bad.yaml"
    exp.write_text("task: digits-mlp\nsearch: {sampler: nsgaa}\n")
    res = runner.invoke(app, ["run", str(exp), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "search.sampler" in res.output and "nsgaa" in res.output
    assert not (tmp_path / "r").exists()


HEAVY = """
import sys
from autocompress.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "ray", "optuna", "pandas") if m in sys.modules)
print("exit", code, "heavy", heavy)
"""


def test_help_and_config_errors_import_no_torch_or_ray(tmp_path: Path) -> None:
    """What makes `--help` and a config error fast: nothing heavy is imported for them."""
    exp = tmp_path / "bad.yaml"
    exp.write_text("task: digits-mlp\nsearch: {trials: 0}\n")
    script = tmp_path / "heavy.py"
    script.write_text(HEAVY)
    for args, code in ((["--help"], 0), (["run", "--help"], 0), (["run", str(exp)], 2)):
        out = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=60
        )
        assert f"exit {code} heavy []" in out.stdout, out.stdout + out.stderr
    lazy = "import autocompress, sys; from autocompress import Task, Plan, compress, search; "
    lazy += "print(sorted(autocompress.__all__) == sorted(n for n in autocompress.__all__ "
    lazy += "if getattr(autocompress, n, None) is not None))"
    out = subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr  # every public name still resolves


def test_help_version_and_option_texts() -> None:
    import typer.main

    from autocompress import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"autocompress {__version__}"
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "``" not in top.output and ":func:" not in top.output
    for name in ("run", "report", "trials", "export", "compress", "tasks", "inspect"):
        assert name in top.output
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in ("compress", "run", "export", "trials"):
        for param in commands[name].params:
            assert param.help, f"{name} --{param.name} has no help text"
    run_opts = {p.name for p in commands["run"].params}
    assert {"seed", "sampler", "trials", "workers", "resume", "refine_margin"} <= run_opts


def test_refine_margin_option_is_checked_before_anything_runs(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text("task: digits-mlp\nsearch: {refine: 2}\n")
    res = runner.invoke(
        app, ["run", str(exp), "--run-dir", str(tmp_path / "r"), "--refine-margin", "-1"]
    )
    assert res.exit_code == 2 and "search.refine_margin" in res.output
    assert not (tmp_path / "r").exists()


def test_export_of_a_missing_run_dir_says_it_does_not_exist(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["export", str(tmp_path / "nope"), "--trial", "x", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "does not exist" in res.output, res.output
    assert "resume" not in res.output


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


USER_TASK = """
from pathlib import Path

from autocompress import get_task

MARKER = Path(__file__).with_name("make_task_ran")


def make_task():
    MARKER.write_text("a teacher would be trained here")
    return get_task("digits-mlp")


def wrong_metric(outputs, targets):
    return 0.0
"""


def _user_experiment(folder: Path, module: str, **objective: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(USER_TASK)
    exp = {
        "task": f"{module}:make_task",
        "objective": {"metrics": ["accuracy", "size_bytes"], **objective},
        "search": {"trials": 2},
    }
    path = folder / "exp.yaml"
    path.write_text(json.dumps(exp))  # JSON is YAML
    return path


@pytest.fixture
def isolated_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.path and PYTHONPATH changes of `run` (the YAML's folder) are undone afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


def test_checks_come_before_any_task_code(tmp_path: Path, isolated_path: None) -> None:
    """A module:function task may train a teacher: nothing of it runs for a refused run."""
    exp = _user_experiment(tmp_path / "exp", "user_task_checks")
    marker = tmp_path / "exp" / "make_task_ran"
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("x")
    started = tmp_path / "started"
    started.mkdir()
    (started / "run.json").write_text(
        json.dumps(
            {
                "task": {"spec": "other:make_task"},
                "objective": {},
                "settings": {"trials": 2, "sampler": "tpe", "seed": 0},
            }
        )
    )
    cases = [
        (["--run-dir", str(used)], "already holds files"),
        (["--run-dir", str(tmp_path / "none"), "--resume"], "holds no run"),
        (["--run-dir", str(started), "--resume"], "task 'user_task_checks:make_task' differs"),
        (["--run-dir", str(tmp_path / "r"), "--sampler", "cmaes"], "search.sampler"),
    ]
    for args, expect in cases:
        res = runner.invoke(app, ["run", str(exp), *args])
        assert res.exit_code == 2 and expect in res.output, res.output
    bad = _user_experiment(tmp_path / "obj", "user_task_obj", constraints=["acc_drop <= 0.01"])
    res = runner.invoke(app, ["run", str(bad), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "unknown metric 'acc_drop'" in res.output, res.output
    assert not marker.exists() and not (tmp_path / "obj" / "make_task_ran").exists()
    # resume settings are checked against run.json before the task too (--seed reaches it)
    data = json.loads((started / "run.json").read_text())
    data["task"]["spec"] = "user_task_checks:make_task"
    from autocompress.objectives import Objective

    data["objective"] = Objective(["accuracy", "size_bytes"], ["accuracy_drop <= 0.01"]).describe()
    (started / "run.json").write_text(json.dumps(data))
    res = runner.invoke(
        app, ["run", str(exp), "--run-dir", str(started), "--resume", "--seed", "5"]
    )
    assert res.exit_code == 2 and "seed=5 but the run was started with 0" in res.output
    assert not marker.exists()


def test_custom_metric_with_a_wrong_signature_is_refused_at_once(
    tmp_path: Path, isolated_path: None
) -> None:
    exp = _user_experiment(
        tmp_path, "user_task_sig", metrics=["accuracy", "user_task_sig:wrong_metric:maximize"]
    )
    res = runner.invoke(app, ["run", str(exp), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "wrong_metric(outputs, targets)" in line
    assert "def wrong_metric(model, artifact, task, *, split='val', reference=None)" in line
    assert not (tmp_path / "make_task_ran").exists()


def test_specs_import_from_the_yaml_folder_and_the_working_directory(
    tmp_path: Path, isolated_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocompress.config import build, load_experiment

    exp = _user_experiment(tmp_path / "beside", "user_task_beside")
    task, _, _ = build(load_experiment(exp), str(exp))
    assert task.spec == "user_task_beside:make_task"
    assert (tmp_path / "beside" / "make_task_ran").is_file()
    assert str(tmp_path / "beside") in os.environ["PYTHONPATH"].split(os.pathsep)  # Ray workers
    cwd = tmp_path / "cwd"
    _user_experiment(cwd, "user_task_cwd")
    elsewhere = tmp_path / "elsewhere" / "exp.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(json.dumps({"task": "user_task_cwd:make_task"}))
    monkeypatch.chdir(cwd)
    task, _, _ = build(load_experiment(elsewhere), str(elsewhere))
    assert task.spec == "user_task_cwd:make_task"
    _user_experiment(tmp_path / "inspect", "user_task_inspect")
    monkeypatch.chdir(tmp_path / "inspect")  # every command sees the working directory
    res = runner.invoke(app, ["inspect", "user_task_inspect:make_task"])
    assert res.exit_code == 0 and "fc1" in res.output, res.output
