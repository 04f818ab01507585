"""Experiment YAML schema (pydantic), validated before anything expensive starts.

Every error is one line naming the file, the key, what was given and what is allowed.

Example:
    >>> exp = parse_experiment({"task": "digits-mlp", "search": {"trials": 4}})
    >>> exp.search.trials
    4
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from autocompress.errors import AutocompressError, ConfigError
from autocompress.spaces._plan import ALLOWED_BITS, SCHEMES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Range = tuple[float, float]


class KnobsConfig(_Strict):
    """Searched ranges; see :class:`autocompress.spaces.Knobs`."""

    sparsity: Range | None = (0.0, 0.95)
    sparsity_step: float = Field(0.05, gt=0, le=0.5)
    bits: list[int] = [2, 3, 4, 5, 6, 8, 16, 32]
    schemes: list[Literal["uniform", "codebook"]] = ["uniform"]
    rank_ratio: Range | None = None
    rank_step: float = Field(0.05, gt=0, le=0.5)
    width: Range | None = None
    width_step: float = Field(0.05, gt=0, le=0.5)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in ALLOWED_BITS]
        if bad or not v:
            raise ValueError(f"bits {bad or v} not allowed; choose from {list(ALLOWED_BITS)}")
        return v


class LayerPin(_Strict):
    sparsity: float = 0.0
    bits: int = 32
    scheme: Literal["uniform", "codebook"] = "uniform"
    rank_ratio: float = 1.0


class SpaceConfig(_Strict):
    knobs: KnobsConfig = KnobsConfig()
    exclude: list[str] = []
    pin: dict[str, LayerPin] = {}
    groups: list[list[str]] = []


class FinetuneConfig(_Strict):
    epochs: int = Field(30, ge=0, le=10_000)
    lr: float = Field(3e-3, gt=0)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    patience: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=1)
    ramp: float = Field(0.33, ge=0, le=1)


class ObjectiveConfig(_Strict):
    metrics: list[str] = ["accuracy", "size_bytes"]
    constraints: list[str] = ["accuracy_drop <= 0.01"]
    weights: dict[str, float] | None = None


class SearchConfig(_Strict):
    sampler: Literal["nsga2", "tpe", "gp", "random"] = "nsga2"
    trials: int = Field(50, ge=1, le=1_000_000)
    workers: int = Field(1, ge=1, le=4096)
    seed: int = 0
    time_budget: float | None = Field(None, gt=0, description="seconds for the whole search")
    trial_timeout: float | None = Field(None, gt=0, description="seconds per trial")
    keep_artifacts: Literal["pareto", "all", "none"] = "pareto"
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    device: Literal["cpu", "cuda"] = "cpu"
    max_failures: int = Field(0, ge=0)
    address: str | None = None
    baselines: bool = True


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


def _format(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    given = err.get("input")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key; check the spelling (see docs/user-guide.md for the allowed keys)"
    given_s = "" if isinstance(given, dict) else f" (got {given!r})"
    more = f" [+{len(e.errors()) - 1} more]" if len(e.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{given_s}{more}"


def parse_experiment(data: Any, source: str = "experiment") -> Experiment:
    """Validate a plain-data experiment and check task, layer names and constraints."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None
    for name in ("sparsity", "rank_ratio", "width"):
        r = getattr(exp.space.knobs, name)
        if r is not None and r[0] > r[1]:
            raise ConfigError(f"{source}: space.knobs.{name}: lower bound {r[0]} > upper {r[1]}")
    for s in exp.space.knobs.schemes:
        if s not in SCHEMES:
            raise ConfigError(f"{source}: space.knobs.schemes: {s!r} not in {list(SCHEMES)}")
    return exp


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file {str(p)!r} not found: check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: fix the syntax") from None
    return parse_experiment(data, str(p))


def build(exp: Experiment, source: str = "experiment") -> tuple[Any, Any, Any]:
    """``(task, space, objective)`` from an experiment, with names checked against the model.

    Builds the task's untrained architecture only (cheap): no teacher training happens here.
    """
    from autocompress.objectives import Objective
    from autocompress.spaces import CompressionSpace, FinetuneSettings, Knobs, LayerPlan
    from autocompress.tasks import get_task

    try:
        task = get_task(exp.task)
        k = exp.space.knobs
        knobs = Knobs(
            sparsity=k.sparsity,
            sparsity_step=k.sparsity_step,
            bits=tuple(k.bits),
            schemes=tuple(k.schemes),
            rank_ratio=k.rank_ratio,
            rank_step=k.rank_step,
            width=k.width,
            width_step=k.width_step,
        )
        space = CompressionSpace.from_model(
            task.build_model(),
            knobs,
            exclude=exp.space.exclude,
            pin={n: LayerPlan(**p.model_dump()) for n, p in exp.space.pin.items()},
            groups=exp.space.groups,
            finetune=FinetuneSettings(**exp.finetune.model_dump()),
        )
        objective = Objective(
            list(exp.objective.metrics),
            list(exp.objective.constraints),
            weights=exp.objective.weights,
        )
    except AutocompressError as e:
        raise ConfigError(f"{source}: {e}") from None
    return task, space, objective
