"""Bad input: fuzzed experiment files and plans, unknown tasks, unreachable clusters, missing
dependencies. Every one must give one line naming the key and what is allowed, before Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rkit import cli, env, write_experiment
from typer.testing import CliRunner

from autocompress.cli import app
from autocompress.config import load_experiment
from autocompress.errors import ConfigError, PlanError
from autocompress.spaces import Plan

VALID: dict[str, Any] = {
    "task": "digits-mlp",
    "run_dir": "runs/fuzz",
    "space": {
        "knobs": {"sparsity": [0.5, 0.9], "bits": [2, 4, 8], "width": [0.5, 1.0]},
        "exclude": [],
        "pin": {"fc3": {"bits": 8}},
        "groups": [["fc1", "fc2"]],
    },
    "finetune": {"epochs": 3, "lr": 0.003, "alpha": 0.7, "patience": 2, "ramp": 0.3},
    "objective": {"metrics": ["accuracy", "size_bytes"], "constraints": ["accuracy_drop <= 0.01"]},
    "search": {"sampler": "nsga2", "trials": 4, "workers": 2, "seed": 0, "address": None},
}
KEYS = [
    ("task",),
    ("run_dir",),
    ("space",),
    ("space", "knobs"),
    *[("space", "knobs", k) for k in ("sparsity", "sparsity_step", "bits", "schemes", "width")],
    *[("space", "knobs", k) for k in ("rank_ratio", "rank_step", "width_step", "heads")],
    ("space", "exclude"),
    ("space", "pin"),
    ("space", "pin", "fc3"),
    ("space", "pin", "fc3", "bits"),
    ("space", "pin", "fc3", "sparsity"),
    ("space", "groups"),
    *[("finetune", k) for k in ("epochs", "lr", "temperature", "alpha", "patience", "ramp")],
    ("finetune", "batch_size"),
    *[("finetune", k) for k in ("accum_steps", "max_steps", "max_seconds", "amp")],
    ("objective", "metrics"),
    ("objective", "constraints"),
    ("objective", "weights"),
    *[("search", k) for k in ("sampler", "trials", "workers", "seed", "time_budget")],
    *[("search", k) for k in ("trial_timeout", "keep_artifacts", "cpus_per_trial")],
    *[("search", k) for k in ("gpus_per_trial", "device", "max_failures", "address")],
    ("search", "baselines"),
]
# task names are never random text: 'module:function' imports and calls arbitrary code
TASKS = st.sampled_from(["digits-mpl", "", "nope_module_xyz:make", "os", ":", "digits-mlp:x"])
LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats()
    | st.text(max_size=8)
    | st.lists(st.integers(-3, 40) | st.floats(-2, 2) | st.text(max_size=3), max_size=4)
    | st.dictionaries(st.text(max_size=5), st.integers(-3, 40) | st.text(max_size=3), max_size=3)
)


class ReachedTheSearch(Exception):
    """Raised where the teacher would be trained: every check has passed by then."""


def _mutate(data: dict, path: tuple[str, ...], value: Any) -> dict:
    out = json.loads(json.dumps(data))
    cur = out
    for p in path[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[path[-1]] = value
    return out


@pytest.fixture(scope="module")
def stop_before_the_search():
    """Make ``search.run`` stop right after its checks (before the teacher, before Ray)."""
    import autocompress.search._driver as driver

    mp = pytest.MonkeyPatch()
    mp.setattr(driver, "_teacher", lambda *a, **k: (_ for _ in ()).throw(ReachedTheSearch()))
    yield
    mp.undo()


def _cli_run(path: Path, run_dir: Path) -> tuple[int, str, BaseException | None]:
    res = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(run_dir)])
    return res.exit_code, res.output, res.exception


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    key=st.sampled_from(KEYS),
    value=LEAF,
    task=TASKS,
    unknown=st.sampled_from([None, "oops", "serch", "knobz"]),
)
@example(key=("space", "pin"), value={"\x85": 0}, task="digits-mlp", unknown=None)
@example(key=("search", "sampler"), value="[/]", task="digits-mlp", unknown=None)
def test_fuzzed_experiment_files_fail_with_one_line_naming_the_key(
    stop_before_the_search, tmp_path_factory, key, value, task, unknown
) -> None:
    import ray

    tally_fuzz["n"] += 1
    data = _mutate(VALID, ("task",), task) if key == ("task",) else _mutate(VALID, key, value)
    if unknown is not None:  # an unknown key at the level of the mutated one
        data = _mutate(data, (*key[:-1], unknown), 1)
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, exc = _cli_run(path, tmp / "run")
    if isinstance(exc, ReachedTheSearch):  # accepted: everything checked, the search would start
        assert unknown is None
        return
    assert code == 2, (data, out, exc)
    line = out.strip()
    assert len(line.splitlines()) == 1, out
    assert line.startswith("error: ") and "Traceback" not in out, out
    named = (unknown or key[-1]) in line or key[0] in line
    assert named, f"{line!r} does not name {'.'.join(key)}"
    assert not ray.is_initialized()  # never after Ray has started


tally_fuzz = {"n": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.binary(max_size=80)
    | st.text(alphabet="{}[]:,-!&*|>'\"#%@ \n\tabctask019.", max_size=120)
    | st.sampled_from(
        [
            b"[" * 5000,
            b"a: &a [*a]",
            b"task: !!python/object/apply:os.system ['true']",
            b"task: digits-mlp\ntask: digits-cnn",
            b"\xff\xfe\x00t",
            b"task: digits-mlp\nsearch: {trials: 1e999}",
        ]
    )
)
def test_fuzzed_yaml_text_never_escapes_as_a_traceback(tmp_path_factory, data: Any) -> None:
    tally_fuzz["n"] += 1
    path = tmp_path_factory.mktemp("yaml") / "exp.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    try:
        load_experiment(path)
    except ConfigError as e:
        assert "\n" not in str(e) and str(path) in str(e)


PLAN = json.loads(Plan.uniform(["fc1", "fc2"], sparsity=0.5, bits=4).to_json())
PLAN_KEYS = [
    ("width",),
    ("_type",),
    ("_version",),
    ("layers",),
    ("finetune",),
    ("surprise",),
    *[("finetune", k) for k in PLAN["finetune"]],
    *[("layers", "fc1", k) for k in ("sparsity", "bits", "scheme", "rank_ratio", "extra")],
    ("layers", "fc1"),
]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(PLAN_KEYS), LEAF)
def test_fuzzed_plan_json_is_refused_cleanly(key: tuple[str, ...], value: Any) -> None:
    """Plan JSON (plan.json in artifacts, records): valid and round-trips, or one PlanError."""
    tally_fuzz["n"] += 1
    text = json.dumps(_mutate(PLAN, key, value))
    try:
        plan = Plan.from_json(text)
    except PlanError as e:
        assert "\n" not in str(e)
        return
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.to_json() == Plan.from_dict(json.loads(plan.to_json())).to_json()
    for lp in plan.layers.values():
        assert type(lp.bits) is int and type(lp.sparsity) in (int, float)
    assert type(plan.width) in (int, float)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '{"finetune": {"lr": null}}', '{"finetune": {"alpha": "x"}}', "\ud800"],
)
def test_hostile_plan_json_gives_plan_error(text: str) -> None:
    try:
        Plan.from_json(text)
    except PlanError as e:
        assert "\n" not in str(e)


# --- real processes: the command line a user types ---------------------------------------------
def _cli(args: list[str], tmp: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, env=env(**extra), cwd=tmp
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_unknown_task_and_unreachable_address(tmp_path: Path, tally) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", trials=2)
    data = yaml.safe_load(exp.read_text())
    data["task"] = "digits-mpl"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(data))
    line = _one_error_line(_cli([*cli(), "run", "typo.yaml"], tmp_path))
    assert "task: unknown task 'digits-mpl': use one of [" in line
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        proc = _cli([*cli(), "run", str(exp), "--address", address, "--run-dir", "r"], tmp_path)
        line = _one_error_line(proc)
        assert f"cannot reach the Ray cluster at address={address!r}" in line
        assert "ray start --head" in line
    assert not (tmp_path / "r").exists()  # nothing was written before failing
    tally["bad inputs tried"] += 3


MISSING = """
import sys
for name in sys.argv[2].split(","):
    if name != "sys":
        sys.modules[name] = None  # `import name` now fails as if it were not installed
from autocompress.cli import app
app(["run", sys.argv[1], "--run-dir", "run"])
"""


@pytest.mark.parametrize(
    ("blocked", "metrics", "expect"),
    [
        ("ray,ray.tune", ["accuracy", "size_bytes"], "'ray.tune'.*pip install 'ray\\[tune\\]"),
        ("optuna", ["accuracy", "size_bytes"], "'optuna'.*pip install optuna"),
        ("onnxruntime", ["accuracy", "latency_ms"], "'onnxruntime'.*pip install onnxruntime$"),
        (
            "sys",  # blocks nothing new: the metric's own import is missing
            ["accuracy", "faultkit:needs_plugin:minimize"],
            "'autocompress_plugin_that_is_not_installed'.*pip install autocompress_plugin",
        ),
    ],
)
def test_missing_dependency_names_the_install_command(
    tmp_path: Path, blocked: str, metrics: list[str], expect: str, tally
) -> None:
    import re

    exp = write_experiment(tmp_path / "exp.yaml", trials=2)
    data = yaml.safe_load(exp.read_text())
    data["objective"]["metrics"] = metrics
    exp.write_text(yaml.safe_dump(data))
    script = tmp_path / "blocked.py"
    script.write_text(textwrap.dedent(MISSING))
    proc = _cli([sys.executable, str(script), str(exp), blocked], tmp_path)
    line = _one_error_line(proc)
    assert re.search(expect, line), line
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # nothing half-made is left behind
    tally["bad inputs tried"] += 1


def test_missing_dependency_message_has_the_extra() -> None:
    from autocompress.search._driver import missing_dependency

    err = missing_dependency(ModuleNotFoundError("no", name="ray.tune"), "search.run")
    assert str(err).endswith("pip install 'ray[tune]==2.60.0'")


@pytest.mark.parametrize("value", ["[/]", "[bold]x", "ray[tune]"])
def test_cli_prints_error_messages_verbatim(tmp_path: Path, value: str) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", trials=2, sampler=value)
    res = CliRunner().invoke(app, ["run", str(exp)])
    assert res.exit_code == 2 and f"(got {value!r})" in res.output, res.output


def test_zz_fuzz_tally(tally) -> None:
    """Runs last in this module: adds the fuzzed examples to the session's figures."""
    tally["bad inputs tried"] += tally_fuzz["n"]


USER_MODULE = """
from pathlib import Path

def make_task():
    Path(__file__).with_name("make_task_ran").write_text("a teacher would be trained")
    raise RuntimeError("make_task must not run")
"""


def test_load_never_runs_a_user_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tally
) -> None:
    """``load(path)`` of a ``module:function`` artifact refuses instead of calling make_task
    (which may train a teacher); a built-in task only rebuilds its untrained architecture."""
    import torch

    from autocompress.artifacts import export, load
    from autocompress.errors import ArtifactError
    from autocompress.tasks import Task, get_task

    (tmp_path / "user_task_load.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    plain = export(net, Plan(), tmp_path / "plain", task_spec="user_task_load:make_task")
    with pytest.raises(ArtifactError) as e:
        load(plain.path)
    assert "pass model=" in str(e.value) and "\n" not in str(e.value)
    assert torch.equal(load(plain.path, model=net)[0].weight, net[0].weight)
    narrow = Plan.uniform(["0", "2"], width=0.5)
    from autocompress.compress import restructure

    small = restructure(net, narrow, torch.randn(3, 4))
    art = export(small, narrow, tmp_path / "narrow", task_spec="user_task_load:make_task")
    with pytest.raises(ArtifactError, match="pass example_input="):
        load(art.path, model=net)
    assert load(art.path, model=net, example_input=torch.randn(3, 4))[0].out_features == 4
    assert not (tmp_path / "make_task_ran").exists()

    def no_teacher(self: Task) -> None:
        raise AssertionError("load() trained a teacher")

    monkeypatch.setattr(Task, "teacher", no_teacher)
    builtin = get_task("digits-mlp").build_model()
    art = export(builtin, Plan(), tmp_path / "builtin", task_spec="digits-mlp")
    assert load(art.path).fc1.in_features == builtin.fc1.in_features  # build_model only
    tally["bad inputs tried"] += 2


def test_new_one_line_messages(tmp_path: Path, tally) -> None:
    from autocompress.objectives import Metric, Objective
    from autocompress.search import SearchResult

    def per_sample(outputs, targets):  # a Task metric's signature, not an objective metric's
        return 0.0

    for make in (
        lambda: Metric("m", "maximize", per_sample),
        lambda: Objective(["accuracy", Metric("m", "max", lambda model: 0.0)]),
        lambda: Metric("m", "max", lambda m, a, t: 0.0, details=lambda m: {}),
    ):
        with pytest.raises(ConfigError) as e:
            make()
        msg = str(e.value)
        assert "cannot be called as" in msg and "(model, artifact, task" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"per_sample\(outputs, targets\)"):
        Metric("m", "maximize", per_sample)
    with pytest.raises(Exception, match="does not exist: check the path") as e:
        SearchResult.load(tmp_path / "missing")
    assert "resume" not in str(e.value)
    tally["bad inputs tried"] += 4
