from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.config import load_experiment, parse_experiment
from autocompress.errors import ConfigError

EXPERIMENTS = sorted(Path(__file__).parent.parent.joinpath("experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_validate(path: Path) -> None:
    from autocompress.config import build

    exp = load_experiment(path)
    _, space, objective = build(exp, str(path))
    assert space.layers and objective is not None


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"task": "digits-mlp", "serch": {}}, "serch: unknown key"),
        ({"task": "digits-mlp", "search": {"sampler": "nsgaa"}}, "search.sampler"),
        ({"task": "digits-mlp", "search": {"trials": 0}}, "search.trials"),
        ({"task": "digits-mlp", "search": {"workers": -1}}, "search.workers"),
        ({"task": "digits-mlp", "search": {"early_stop": {"margin": 2}}}, "early_stop"),
        ({"task": "digits-mlp", "search": {"early_stop": {"aftr": 0.5}}}, "aftr"),
        ({"task": "digits-mlp", "space": {"knobs": {"bits": [4, 9]}}}, "space.knobs.bits"),
        ({"task": "digits-mlp", "space": {"knobs": {"sparsity": [0.9, 0.1]}}}, "lower bound"),
        ({"search": {}}, "task"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_experiments_name_the_key(data: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        parse_experiment(data, "x.yaml")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"task": "digits-mpl"}, "unknown task"),
        ({"task": "digits-mlp", "space": {"exclude": ["fc9"]}}, "unknown layer 'fc9'"),
        ({"task": "digits-mlp", "space": {"pin": {"fc1": {"bits": 9}}}}, "bits"),
    ],
)
def test_build_checks_names_against_the_model(data: dict, match: str) -> None:
    from autocompress.config import build

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=match):
        build(parse_experiment(data, "x.yaml"), "x.yaml")
    assert time.monotonic() - t0 < 2.0


def test_yaml_syntax_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_early_stop_settings() -> None:
    assert parse_experiment({"task": "digits-mlp"}).search.early_stop is None
    on = parse_experiment({"task": "digits-mlp", "search": {"early_stop": True}})
    assert on.search.early_stop.after == 0.34
    tuned = parse_experiment({"task": "digits-mlp", "search": {"early_stop": {"after": 0.5}}})
    assert tuned.search.early_stop.after == 0.5 and tuned.search.early_stop.margin == 0.05


def test_overrides() -> None:
    exp = parse_experiment({"task": "digits-mlp"}).with_overrides(trials=3, run_dir="r")
    assert exp.search.trials == 3 and exp.run_dir == "r"


_keys = st.sampled_from(["task", "run_dir", "space", "search", "objective", "finetune", "oops"])
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=True)
    | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5))
def test_fuzzed_experiments_fail_cleanly(data: dict) -> None:
    """Any input either validates or raises a one-line ConfigError, never another exception."""
    try:
        parse_experiment(yaml.safe_load(yaml.safe_dump(data)), "fuzz.yaml")
    except ConfigError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"task": "digits-mlp", "search": {"time_budget": float("inf")}}, "finite number"),
        ({"task": "digits-mlp", "search": {"seed": -1}}, "search.seed: .*greater than or equal"),
        ({"task": "digits-mlp", "search": {"address": "no address"}}, "search.address: use 'auto'"),
        ({"task": "digits-mlp", "objective": {"metrics": []}}, "objective.metrics"),
        (
            {"task": "digits-mlp", "space": {"knobs": {"sparsity": [0.1]}}},
            r"space.knobs.sparsity: sparsity must be null or \[low, high\]",
        ),
        ({"task": "digits-mlp", "space": {"knobs": {"width": [0, 1]}}}, r"in \(0, 1\]"),
        (
            {"task": "digits-mlp", "search": {"oops": 1}},
            r"search.oops: unknown key: allowed keys are \['address', 'baselines'",
        ),
        (
            {"task": "digits-mlp", "space": {"pin": {"fc1": {"bitz": 3}}}},
            r"space.pin.fc1.bitz: unknown key: allowed keys are \['bits', 'group', 'hot_bits', "
            r"'hot_rows', 'rank_ratio'",
        ),
        ({"task": "digits-mlp", "space": {"pin": {"\x85": 0}}}, r"space.pin.\\x85: Input"),
        ({"task": "digits-mlp", "search": {"sampler": "x" * 500}}, r"\(got 'xxxx.*\.\.\.\)$"),
    ],
)
def test_messages_name_the_key_and_what_is_allowed(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        parse_experiment(data, "x.yaml")
    assert str(e.value).isprintable() and len(str(e.value)) < 400


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"task: digits-mlp\ntask: digits-cnn\n", r"line 2 \(duplicate key 'task'\)"),
        (b"\xff\xfetask: x", "not UTF-8 text"),
        (b"a: " + b"[" * 5000, "nested too deeply|not valid YAML"),
        (b"task: !!python/object/apply:os.system ['true']", "not valid YAML"),
    ],
)
def test_hostile_files_are_refused_in_one_line(tmp_path: Path, raw: bytes, match: str) -> None:
    p = tmp_path / "x.yaml"
    p.write_bytes(raw)
    with pytest.raises(ConfigError, match=match) as e:
        load_experiment(p)
    assert "\n" not in str(e.value)


def test_build_errors_name_the_section() -> None:
    from autocompress.config import build

    with pytest.raises(ConfigError, match=r"^x.yaml: objective: "):
        build(
            parse_experiment({"task": "digits-mlp", "objective": {"metrics": ["nope"]}}), "x.yaml"
        )
    with pytest.raises(ConfigError, match=r"^x.yaml: task: unknown task"):
        build(parse_experiment({"task": "digits-mpl"}), "x.yaml")


def test_config_constants_match_the_spaces() -> None:
    """config.py keeps its own copies (importing the spaces would import torch)."""
    from autocompress import config
    from autocompress.spaces import ALLOWED_BITS, SCHEMES

    assert config.ALLOWED_BITS == ALLOWED_BITS and config.SCHEMES == SCHEMES


def test_heads_knob_and_finetune_budgets_reach_the_space() -> None:
    from autocompress.config import build

    exp = parse_experiment(
        {
            "task": "mnist1d-transformer",
            "space": {"knobs": {"width": [0.5, 1.0], "heads": [0.5, 1.0]}},
            "finetune": {"max_steps": 20, "accum_steps": 2, "max_seconds": 9.5, "amp": False},
        }
    )
    _, space, _ = build(exp)
    assert space.knobs.heads == (0.5, 1.0)
    ft = space.finetune
    assert (ft.max_steps, ft.accum_steps, ft.max_seconds, ft.amp) == (20, 2, 9.5, False)
    with pytest.raises(ConfigError, match="heads"):
        parse_experiment({"task": "digits-mlp", "space": {"knobs": {"heads": [0.0, 1.0]}}})


def test_refine_margin_setting() -> None:
    assert parse_experiment({"task": "digits-mlp"}).search.refine_margin == 1.0
    exp = parse_experiment({"task": "digits-mlp", "search": {"refine": 4, "refine_margin": 0.5}})
    assert exp.search.refine_margin == 0.5
    assert exp.with_overrides(refine_margin=0.0).search.refine_margin == 0.0
    for bad in (-0.1, ".nan", "lots"):
        with pytest.raises(ConfigError, match="search.refine_margin"):
            parse_experiment({"task": "digits-mlp", "search": {"refine_margin": bad}})
