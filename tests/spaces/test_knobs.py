"""The knob registry is the one source of truth for knobs, their rules and their ranges.

Adding a knob now touches: one ``register(KnobSpec(...))`` in ``spaces/_knobs.py``, its field on
``LayerPlan`` (or ``Plan``), its range field on ``Knobs`` and ``KnobsConfig`` and the engine
function applying it. The tests below fail when one of those places is forgotten or when two
places disagree on a rule.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from pydantic import ValidationError

from autocompress.config import FinetuneConfig, KnobsConfig, LayerPin, parse_experiment
from autocompress.errors import ConfigError, PlanError
from autocompress.spaces import KNOBS, FinetuneSettings, Knobs, KnobSpec, LayerPlan, Plan
from autocompress.spaces._knobs import PHASES, STEP_MAX, knobs_of, register
from autocompress.spaces._plan import FINETUNE_BOUNDS


def test_every_plan_knob_is_registered_once() -> None:
    assert [s.name for s in knobs_of("layer")] == [f.name for f in fields(LayerPlan)]
    model_fields = {f.name for f in fields(Plan)} - {"layers", "finetune"}
    assert {s.name for s in knobs_of("model")} == model_fields
    assert all(s.phase in PHASES for s in KNOBS.values())
    with pytest.raises(PlanError, match="registered twice"):
        register(KnobSpec("bits", "layer", 32, "quantize", "bad"))


def test_defaults_are_the_identity_and_valid() -> None:
    lp, plan = LayerPlan(), Plan()
    for spec in KNOBS.values():
        assert spec.allows(spec.default), spec.name
        owner = lp if spec.scope == "layer" else plan
        assert getattr(owner, spec.name) == spec.default
    assert lp.is_identity and plan.is_identity
    assert LayerPin().model_dump() == {s.name: s.default for s in knobs_of("layer")}


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("sparsity", 1.0),
        ("sparsity", True),
        ("bits", 9),
        ("bits", True),
        ("scheme", "fancy"),
        ("rank_ratio", 0.0),
        ("rank_ratio", math.nan),
        ("width", 1.5),
        ("heads", 0.0),
    ],
)
def test_plan_validation_is_the_registry_rule(name: str, bad: object) -> None:
    spec = KNOBS[name]
    assert not spec.allows(bad)
    with pytest.raises(PlanError) as e:
        LayerPlan(**{name: bad}) if spec.scope == "layer" else Plan(**{name: bad})
    assert str(e.value) == spec.problem(bad) and "\n" not in str(e.value)


def test_searched_ranges_are_checked_by_the_registry() -> None:
    for spec in KNOBS.values():
        assert spec.range_key is not None and hasattr(Knobs(), spec.range_key), spec.name
        assert spec.step_key is None or hasattr(Knobs(), spec.step_key)
    with pytest.raises(PlanError, match=r"knob heads=\(0.0, 1.0\): give \[low, high\]"):
        Knobs(heads=(0.0, 1.0))
    with pytest.raises(PlanError, match="lower bound"):
        Knobs(width=(0.9, 0.5))
    with pytest.raises(PlanError, match="knob bits"):
        Knobs(bits=(4, 9))
    with pytest.raises(PlanError, match="width_step"):
        Knobs(width_step=STEP_MAX + 0.1)


def test_yaml_knobs_are_the_space_knobs() -> None:
    """KnobsConfig has Knobs' fields and defaults, and refuses what Knobs refuses."""
    assert list(KnobsConfig.model_fields) == [f.name for f in fields(Knobs)]
    dumped = KnobsConfig().model_dump()
    assert {n: tuple(v) if isinstance(v, list) else v for n, v in dumped.items()} == {
        f.name: getattr(Knobs(), f.name) for f in fields(Knobs)
    }
    for key, bad in [("heads", [0.0, 1.0]), ("sparsity", [0.0, 1.0]), ("width_step", 0.6)]:
        with pytest.raises(PlanError):
            Knobs(**{key: tuple(bad) if isinstance(bad, list) else bad})
        with pytest.raises(ConfigError, match=f"space.knobs.{key}"):
            parse_experiment({"task": "t", "space": {"knobs": {key: bad}}})
    with pytest.raises(ConfigError, match="heads: lower bound"):
        parse_experiment({"task": "t", "space": {"knobs": {"heads": [0.9, 0.5]}}})


def _probes(name: str) -> list[object]:
    b = FINETUNE_BOUNDS[name]
    edges = [x for x in (b.ge, b.gt, b.le) if x is not None]
    out: list[object] = [True, False, None, "1", 0, 1, -1]
    for x in edges:
        out += [x, x - 1, x + 1, x - 0.5, x + 0.5, float(x)]
    return out


@pytest.mark.parametrize("name", [f.name for f in fields(FinetuneSettings)])
def test_finetune_yaml_and_plan_rules_agree(name: str) -> None:
    """FinetuneConfig and FinetuneSettings read one table (FINETUNE_BOUNDS): same default,
    and a value the plan refuses is refused in YAML too."""
    assert name in FINETUNE_BOUNDS and set(FINETUNE_BOUNDS) == set(FinetuneConfig.model_fields)
    assert getattr(FinetuneConfig(), name) == getattr(FinetuneSettings(), name)
    for v in _probes(name):
        try:
            FinetuneSettings(**{name: v})
            plan_ok = True
        except PlanError as e:
            plan_ok = False
            assert str(e).startswith(f"finetune.{name}=")
        try:
            yaml_v = getattr(FinetuneConfig(**{name: v}), name)
            yaml_ok = True
        except ValidationError:
            yaml_ok = False
        if plan_ok:  # what a plan accepts, a YAML file accepts
            assert yaml_ok, (name, v)
        if yaml_ok:  # pydantic may coerce "1" or 1.0 to the type; the coerced value is valid
            FinetuneSettings(**{name: yaml_v})


def test_describe_lists_the_offered_knobs_from_the_registry() -> None:
    from autocompress.spaces import CompressionSpace
    from autocompress.tasks._models import DigitsMLP

    space = CompressionSpace.from_model(DigitsMLP())
    assert {r["knobs"] for r in space.describe()} == {"sparsity,bits,rank,group"}
    assert KNOBS["rank_ratio"].offered(space.layers[0]) is None


def test_hot_rows_are_offered_to_the_tables_that_can_be_split() -> None:
    """The space offers ``hot_rows`` exactly where ``TieredEmbedding`` accepts the table: a
    subclass that only looks rows up is offered it; a table with its own forward or max_norm
    is not (its trials would all be refused)."""
    from torch import nn

    from autocompress.spaces import CompressionSpace

    class PlainSub(nn.Embedding):
        pass

    class Scaled(nn.Embedding):
        def forward(self, input):  # type: ignore[no-untyped-def]
            return super().forward(input) * 2.0

    net = nn.ModuleDict(
        {
            "plain": nn.Embedding(20, 4),
            "sub": PlainSub(20, 4),
            "scaled": Scaled(20, 4),
            "capped": nn.Embedding(20, 4, max_norm=1.0),
            "fc": nn.Linear(4, 4),
        }
    )
    layers = {layer.name: layer for layer in CompressionSpace.from_model(net).layers}
    why = {n: KNOBS["hot_rows"].offered(layer) for n, layer in layers.items()}
    assert why["plain"] is None and why["sub"] is None
    assert "own forward" in why["scaled"] and "max_norm" in why["capped"]
    assert why["fc"] == "hot rows: embedding tables only"


def test_group_knob_rules() -> None:
    assert LayerPlan(bits=4, group=32).group == 32 and LayerPlan().group == 0
    for bad in (24, 512, True, "32"):
        with pytest.raises(PlanError, match=r"^group=.* is not allowed"):
            LayerPlan(bits=4, group=bad)  # type: ignore[arg-type]
    for kw in ({"bits": 16}, {"bits": 32}, {"bits": 4, "scheme": "codebook"}):
        with pytest.raises(PlanError, match="needs scheme 'uniform' and bits <= 8") as e:
            LayerPlan(group=32, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(PlanError, match="knob groups"):
        Knobs(groups=(0, 48))
    with pytest.raises(PlanError, match="calibration='awq' is unknown"):
        Plan(calibration="awq")
    with pytest.raises(PlanError, match="knob calibration"):
        Knobs(calibration=("gptq", "magic"))


def test_group_and_calibration_survive_json_and_old_plans_load() -> None:
    p = Plan.uniform(["fc1", "fc2"], bits=4, group=64, calibration="gptq")
    assert Plan.from_json(p.to_json()) == p and Plan.from_json(p.to_json(compact=True)) == p
    assert '"group":64' in p.deployment_json() and '"calibration":"gptq"' in p.to_json()
    old = '{"_type":"Plan","_version":1,"layers":{"fc1":{"bits":4,"sparsity":0.5}}}'
    back = Plan.from_json(old)
    assert back.layers["fc1"].group == 0 and back.calibration == "none"
    assert "calibration" not in Plan.uniform(["fc1"], bits=4).to_json()  # older readers load it


def test_suggest_samples_groups_only_where_they_mean_something() -> None:
    import optuna

    from autocompress.spaces import CompressionSpace
    from autocompress.tasks._models import DigitsMLP

    knobs = Knobs(bits=(4, 16), groups=(0, 32), calibration=("none", "gptq"), sparsity=None)
    space = CompressionSpace.from_model(DigitsMLP(), knobs)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_groups, seen_cal = set(), set()
    for _ in range(40):
        plan = space.suggest(study.ask())
        seen_cal.add(plan.calibration)
        for lp in plan.layers.values():
            seen_groups.add((lp.bits, lp.group))
    assert seen_groups == {(4, 0), (4, 32), (16, 0)} and seen_cal == {"none", "gptq"}
    default = CompressionSpace.from_model(DigitsMLP())
    plan = default.suggest(optuna.create_study().ask())
    assert plan.calibration == "none" and all(lp.group == 0 for lp in plan.layers.values())


def test_yaml_groups_and_calibration_reach_the_space() -> None:
    import yaml

    from autocompress.config import build

    text = """
task: digits-mlp
space:
  knobs: {bits: [4, 8], groups: [0, 16, 64], calibration: [none, gptq]}
  pin: {fc3: {bits: 8, group: 32}}
"""
    exp = parse_experiment(yaml.safe_load(text))
    _, space, _ = build(exp)
    assert space.knobs.groups == (0, 16, 64) and space.knobs.calibration == ("none", "gptq")
    assert space.pin["fc3"] == LayerPlan(bits=8, group=32)
    dumped = yaml.safe_load(yaml.safe_dump(exp.model_dump(mode="json")))
    assert parse_experiment(dumped) == exp
    with pytest.raises(ConfigError, match="space.knobs.groups"):
        parse_experiment({"task": "t", "space": {"knobs": {"groups": [0, 20]}}})
    with pytest.raises(ConfigError, match="space.knobs.calibration"):
        parse_experiment({"task": "t", "space": {"knobs": {"calibration": ["awq"]}}})
    with pytest.raises(ConfigError, match="needs scheme 'uniform'"):
        build(parse_experiment({"task": "digits-mlp", "space": {"pin": {"fc3": {"group": 32}}}}))


def test_yaml_group_by_role_and_sensitivity_reach_the_space_and_search() -> None:
    """``space.group_by: role`` ties layers exactly as the Python API does; ``search.sensitivity``
    is parsed (the CLI passes it to ``search.run``)."""
    import yaml

    from autocompress.config import build
    from autocompress.spaces import CompressionSpace

    text = """
task: digits-mlp
space: {group_by: role, depth_buckets: 2}
search: {sensitivity: true}
"""
    exp = parse_experiment(yaml.safe_load(text))
    task, space, _ = build(exp)
    same = CompressionSpace.from_model(task.build_model(), group_by="role", depth_buckets=2)
    assert space.groups == same.groups and exp.search.sensitivity is True
    assert parse_experiment({"task": "digits-mlp"}).search.sensitivity is False
