"""Experiment YAML schema (pydantic), validated before anything expensive starts.

Every error is one line naming the file, the key, what was given and what is allowed.

Example:
    >>> exp = parse_experiment({"task": "digits-mlp", "search": {"trials": 4}})
    >>> exp.search.trials
    4
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from autocompress.errors import AutocompressError, ConfigError
from autocompress.spaces._knobs import (
    ALLOWED_BITS,
    ALLOWED_GROUPS,
    CALIBRATIONS,
    KNOBS,
    SCHEMES,
    STEP_MAX,
    Knobs,
)
from autocompress.spaces._plan import FINETUNE_BOUNDS, FinetuneSettings

# The knob registry and the plan's rules import no torch (a config error must come back in well
# under a second); the ranges and bounds below are read from them, never copied.
_KNOBS = Knobs()
_FINETUNE = FinetuneSettings()
MAX_FILE_BYTES = 1 << 20
ADDRESS_PATTERN = r"^(auto|local|ray://[\w.\-]+(:\d+)?|[\w.\-]+:\d+)$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Range = tuple[float, float]


_RANGED = {s.range_key: s for s in KNOBS.values() if s.range_key and s.choices is None}
"""Knob range keys of ``space.knobs`` whose values are ``[low, high]`` (the knob registry)."""


def _range(name: str, v: Any) -> Any:
    """``None`` or ``[low, high]`` of finite numbers within the knob's interval (its
    :class:`~autocompress.spaces.KnobSpec`), a clear error otherwise."""
    if v is None:
        return v
    spec = _RANGED[name]
    ok = isinstance(v, list | tuple) and len(v) == 2
    ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    if not (ok and all(math.isfinite(x) and spec.allows(x) for x in v)):
        raise ValueError(f"{name} must be null or [low, high] with numbers in {spec.interval}")
    return v


def _step(name: str) -> Any:
    """A grid step field: ``Knobs``' default, within (0, STEP_MAX] as ``Knobs`` checks."""
    return Field(getattr(_KNOBS, name), gt=0, le=STEP_MAX)


class KnobsConfig(_Strict):
    """Searched ranges; see :class:`autocompress.spaces.Knobs` (defaults and rules come from
    it and from the knob registry; a test keeps the fields equal)."""

    sparsity: Range | None = _KNOBS.sparsity
    sparsity_step: float = _step("sparsity_step")
    bits: list[int] = list(_KNOBS.bits)
    schemes: list[Literal["uniform", "codebook"]] = list(_KNOBS.schemes)
    rank_ratio: Range | None = _KNOBS.rank_ratio
    rank_step: float = _step("rank_step")
    width: Range | None = _KNOBS.width
    width_step: float = _step("width_step")
    heads: Range | None = _KNOBS.heads
    groups: list[int] = list(_KNOBS.groups)
    calibration: list[str] = list(_KNOBS.calibration)
    hot_rows: Range | None = _KNOBS.hot_rows
    hot_rows_step: float = _step("hot_rows_step")
    hot_bits: list[int] = list(_KNOBS.hot_bits)

    @field_validator(*_RANGED, mode="before")
    @classmethod
    def _ranges(cls, v: Any, info: Any) -> Any:
        return _range(info.field_name, v)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in ALLOWED_BITS]
        if bad or not v:
            raise ValueError(f"bits {bad or v} not allowed; choose from {list(ALLOWED_BITS)}")
        return v

    @field_validator("hot_bits")
    @classmethod
    def _hot_bits(cls, v: list[int]) -> list[int]:
        ok = KNOBS["hot_bits"].choices or ()
        bad = [b for b in v if b not in ok]
        if bad or not v:
            raise ValueError(f"hot_bits {bad or v} not allowed; choose from {list(ok)}")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[int]) -> list[int]:
        bad = [g for g in v if g not in ALLOWED_GROUPS]
        if bad or not v:
            raise ValueError(f"groups {bad or v} not allowed; choose from {list(ALLOWED_GROUPS)}")
        return v

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in CALIBRATIONS]
        if bad or not v:
            raise ValueError(f"calibration {bad or v} unknown; choose from {list(CALIBRATIONS)}")
        return v


class LayerPin(_Strict):
    """Fixed knobs of one layer (``LayerPlan`` checks the values with the knob registry)."""

    sparsity: float = KNOBS["sparsity"].default
    bits: int = KNOBS["bits"].default
    scheme: Literal["uniform", "codebook"] = KNOBS["scheme"].default
    rank_ratio: float = KNOBS["rank_ratio"].default
    group: int = KNOBS["group"].default
    hot_rows: float = KNOBS["hot_rows"].default
    hot_bits: int = KNOBS["hot_bits"].default


class SpaceConfig(_Strict):
    knobs: KnobsConfig = KnobsConfig()
    exclude: list[str] = []
    pin: dict[str, LayerPin] = {}
    groups: list[list[str]] = []
    group_by: Literal["role"] | None = Field(
        None, description="tie free layers by role and depth: a handful of knobs on deep models"
    )
    depth_buckets: int = Field(3, ge=1, le=64, description="depth buckets of group_by: role")


def _ft(name: str) -> Any:
    """Field ``name`` of ``finetune``: default and bounds of ``FinetuneSettings``
    (``spaces._plan.FINETUNE_BOUNDS``), so the YAML file and the plan cannot disagree."""
    return Field(getattr(_FINETUNE, name), **FINETUNE_BOUNDS[name].field_kwargs())


class FinetuneConfig(_Strict):
    """Fine-tune settings; see :class:`autocompress.spaces.FinetuneSettings`."""

    epochs: int = _ft("epochs")
    lr: float = _ft("lr")
    temperature: float = _ft("temperature")
    alpha: float = _ft("alpha")
    patience: int = _ft("patience")
    batch_size: int = _ft("batch_size")
    ramp: float = _ft("ramp")
    accum_steps: int = _ft("accum_steps")
    max_steps: int = _ft("max_steps")
    max_seconds: float = _ft("max_seconds")
    amp: bool = _ft("amp")
    distill: Literal["output", "hidden"] = _ft("distill")
    hidden_weight: float = _ft("hidden_weight")
    dropout: bool = _ft("dropout")
    warmup: float = _ft("warmup")


class ObjectiveConfig(_Strict):
    metrics: list[str] = Field(["accuracy", "size_bytes"], min_length=1)
    constraints: list[str] = ["accuracy_drop <= 0.01"]
    weights: dict[str, float] | None = None
    score_runtime: Literal["torch", "onnxruntime"] = Field(
        "torch", description="where the task metric is scored: the PyTorch model or its ONNX form"
    )


class EarlyStopConfig(_Strict):
    """``early_stop: {after: 0.34, margin: 0.05}``; ``true`` takes these values, ``false`` (the
    default) turns it off."""

    after: float = Field(0.34, gt=0, le=1, description="fraction of the epochs before judging")
    margin: float = Field(0.05, ge=0, lt=1, description="score units below the feasible floor")


class SearchConfig(_Strict):
    sampler: Literal["nsga2", "tpe", "gp", "random"] = "tpe"
    trials: int = Field(50, ge=1, le=1_000_000)
    workers: int = Field(1, ge=1, le=4096)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    time_budget: float | None = Field(None, gt=0, description="seconds for the whole search")
    trial_timeout: float | None = Field(None, gt=0, description="seconds per trial")
    keep_artifacts: Literal["pareto", "all", "none"] = "pareto"
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    device: Literal["cpu", "cuda"] = "cpu"
    max_failures: int = Field(0, ge=0, le=1000)
    address: str | None = None
    baselines: bool = True
    early_stop: EarlyStopConfig | None = None
    refine: int = Field(0, ge=0, description="calibration-only trials, then fine-tune the K best")
    screen_steps: int = Field(0, ge=0, description="optimizer steps of a screening trial (0: none)")
    refine_margin: float = Field(
        1.0,
        ge=0,
        allow_inf_nan=False,
        description="refine first the screened plans whose summed relative constraint violation "
        "is at most this (0: feasible first)",
    )
    sensitivity: bool = Field(
        False, description="measure each layer unit alone first; open with plans built from it"
    )

    @field_validator("early_stop", mode="before")
    @classmethod
    def _early_stop(cls, v: Any) -> Any:
        if v is True:
            return {}
        return None if v is False else v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.match(ADDRESS_PATTERN, v):
            raise ValueError("use 'auto', 'host:port' or 'ray://host:port' (or leave it unset)")
        return v


class Experiment(_Strict):
    """A whole experiment file."""

    task: str
    run_dir: str = "runs/latest"
    space: SpaceConfig = SpaceConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    search: SearchConfig = SearchConfig()

    def with_overrides(self, **overrides: Any) -> Experiment:
        """A copy with ``search``-level and ``run_dir`` overrides (``None`` values ignored)."""
        search = self.search.model_dump()
        run_dir = overrides.pop("run_dir", None) or self.run_dir
        search.update({k: v for k, v in overrides.items() if v is not None})
        return parse_experiment({**self.model_dump(), "search": search, "run_dir": run_dir})


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class holding the key at ``loc`` (for listing the allowed keys)."""
    cls: Any = Experiment
    for part in loc[:-1]:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            field = cls.model_fields.get(str(part))
            if field is None:
                return None
            cls = field.annotation
        else:  # dict[str, Model] or Model | None: look inside
            args = [a for a in typing.get_args(cls) if a is not type(None)]
            cls = args[-1] if args else None
            continue
        while not (isinstance(cls, type) and issubclass(cls, BaseModel)) and typing.get_args(cls):
            if typing.get_origin(cls) is dict:
                break
            args = [a for a in typing.get_args(cls) if a is not type(None)]
            cls = args[0]
    while cls is not None and typing.get_origin(cls) is dict:
        cls = typing.get_args(cls)[1]
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped (messages stay on one line)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = tuple(err["loc"])
    while loc and isinstance(loc[-1], int) and err["type"] in ("missing", "too_long", "too_short"):
        loc = loc[:-1]  # "sparsity.1: Field required" means "sparsity needs two numbers"
    where = ".".join(str(p) for p in loc) or "(top level)"
    given = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model = _model_at(loc)
        allowed = f": allowed keys are {sorted(model.model_fields)}" if model else ""
        msg = f"unknown key{allowed} (see docs/user-guide.md)"
    elif err["type"] in ("missing", "too_long", "too_short") and "sparsity" in where + "width":
        msg = "give [low, high]: two numbers"
    given_s = (
        ""
        if isinstance(given, dict) or err["type"] == "extra_forbidden"
        else (f" (got {_short(given)})")
    )
    more = f" [+{len(e.errors()) - 1} more]" if len(e.errors()) > 1 else ""
    return one_line(f"{source}: {where}: {msg}{given_s}{more}")


def parse_experiment(data: Any, source: str = "experiment") -> Experiment:
    """Validate a plain-data experiment and check task, layer names and constraints."""
    if not isinstance(data, dict):
        raise ConfigError(
            one_line(f"{source}: expected a mapping of keys, got {type(data).__name__}")
        )
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None
    for name in _RANGED:
        r = getattr(exp.space.knobs, name)
        if r is not None and r[0] > r[1]:
            raise ConfigError(
                one_line(f"{source}: space.knobs.{name}: lower bound {r[0]} > upper {r[1]}")
            )
    for s in exp.space.knobs.schemes:
        if s not in SCHEMES:
            raise ConfigError(
                one_line(f"{source}: space.knobs.schemes: {s!r} not in {list(SCHEMES)}")
            )
    return exp


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice (the second would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key) if isinstance(key, typing.Hashable) else None
        return super().construct_mapping(node, deep=deep)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML file (UTF-8, at most 1 MiB, no duplicate keys)."""
    p = Path(path)
    name = one_line(str(p))
    if not p.is_file():
        raise ConfigError(f"experiment file {str(p)!r} not found: check the path")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{name}: {p.stat().st_size} bytes is too large for an experiment file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        why = f" ({problem})" if problem and "duplicate" in problem else ""
        raise ConfigError(f"{name}: not valid YAML{where}{why}: fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to be an experiment file") from None
    try:
        return parse_experiment(data, str(p))
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply to be an experiment file") from None


def importable(*dirs: str | Path) -> None:
    """Make ``module:function`` specs in ``dirs`` importable, here and in local Ray workers.

    Each directory is put at the front of ``sys.path`` and of ``PYTHONPATH`` (which the Ray
    workers this process starts inherit). :func:`build` calls it with the experiment file's
    directory and the current working directory.

    Example:
        >>> import sys
        >>> importable(".")
        >>> str(Path(".").resolve()) in sys.path
        True
    """
    import os
    import sys

    env = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for d in reversed([str(Path(d).resolve()) for d in dirs]):
        if d not in sys.path:
            sys.path.insert(0, d)
        if d not in env:
            env.insert(0, d)
    os.environ["PYTHONPATH"] = os.pathsep.join(env)


def build_objective(exp: Experiment, source: str = "experiment") -> Any:
    """The experiment's :class:`~autocompress.objectives.Objective`, built before the task.

    Custom metrics (``module:function``) are imported and their signatures checked here, so a
    bad objective is refused before any task code (which may train a teacher) runs.
    """
    from autocompress.objectives import Objective

    if source != "experiment":
        importable(Path(source).parent, Path.cwd())
    try:
        return Objective(
            list(exp.objective.metrics),
            list(exp.objective.constraints),
            weights=exp.objective.weights,
            score_runtime=exp.objective.score_runtime,
        )
    except AutocompressError as e:
        raise ConfigError(one_line(f"{source}: objective: {e}")) from None


def build(
    exp: Experiment, source: str = "experiment", objective: Any = None
) -> tuple[Any, Any, Any]:
    """``(task, space, objective)`` from an experiment, with names checked against the model.

    The objective is built first (see :func:`build_objective`; pass one already built as
    ``objective``), then the task. ``module:function`` specs are importable from the
    experiment file's directory and the current working directory (:func:`importable`).
    Builds the task's untrained architecture only: no teacher training happens here.
    """
    from autocompress.spaces import CompressionSpace, LayerPlan
    from autocompress.tasks import get_task

    if objective is None:
        objective = build_objective(exp, source)
    elif source != "experiment":
        importable(Path(source).parent, Path.cwd())
    section = "task"
    try:
        task = get_task(exp.task)
        section = "finetune"
        finetune = FinetuneSettings(**exp.finetune.model_dump())
        section = "space"
        knobs = Knobs(
            **{
                n: tuple(v) if isinstance(v, list | tuple) else v
                for n, v in exp.space.knobs.model_dump().items()
            }
        )
        space = CompressionSpace.from_model(
            task.build_model(),
            knobs,
            exclude=exp.space.exclude,
            pin={n: LayerPlan(**p.model_dump()) for n, p in exp.space.pin.items()},
            groups=exp.space.groups,
            finetune=finetune,
            group_by=exp.space.group_by,
            depth_buckets=exp.space.depth_buckets,
        )
    except AutocompressError as e:
        raise ConfigError(one_line(f"{source}: {section}: {e}")) from None
    return task, space, objective
