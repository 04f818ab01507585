"""Objective: the metrics to optimize, the constraints to satisfy, optional weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from autocompress.errors import ConfigError
from autocompress.objectives._constraint import DERIVED, Constraint
from autocompress.objectives._metric import (
    Metric,
    Reference,
    get_metric,
    is_metric_name,
    metric_names,
)
from autocompress.objectives._runtime import SCORE_RUNTIMES, choice_setting, runtime_scores

if TYPE_CHECKING:
    from torch import nn

    from autocompress.artifacts import Artifact
    from autocompress.tasks import Task

RESERVED = frozenset(
    {"score", "feasible", "violation", "status", "reason", "trial_id", "duration_s", "width"}
)
"""Column names the search uses itself; a metric cannot take them."""

ALWAYS = ("accuracy", "size_bytes")
"""Computed for every candidate, whatever the objective (cheap, and every report shows them)."""


@dataclass
class Objective:
    """Metrics to optimize together (a Pareto front), constraints, and optional weights.

    Args:
        metrics: :class:`Metric` objects or names (``"accuracy"``, ``"size_bytes"``,
            ``"compression_ratio"``, ``"params"``, ``"latency_ms"``, ``"speedup"``,
            ``"macs"``, ``"bitops"``, ``"onnx_bytes"``, parametrized latency names such as
            ``"latency_ms_b1_torch"``, registered names, ``"module:function"``).
        constraints: :class:`Constraint` objects or strings such as ``"accuracy_drop <= 0.01"``;
            a constraint may name any metric above, a registered metric, or ``accuracy_drop``
            (teacher accuracy minus candidate accuracy on the same split).
        weights: ``{metric: weight}``; when given, :meth:`scalarize` turns the metrics into one
            number to maximize, ``sum(weight * value)`` with minimized metrics negated, and the
            search optimizes that single ``score``.
        score_runtime: ``"torch"`` (default: ``accuracy`` is the PyTorch model's task score) or
            ``"onnxruntime"``: ``accuracy`` is the score of the ONNX form the candidate deploys
            as, run by ONNX Runtime over the split; if the faster form breaks a constraint on
            ``accuracy``/``accuracy_drop``, the form that meets it is reported, and the
            ``onnx_form_*``/``onnx_score_*`` values say which and why (see
            ``autocompress.objectives._runtime``).

    Example:
        >>> obj = Objective(["accuracy", "size_bytes"], ["accuracy_drop <= 0.01"])
        >>> obj.names, obj.directions
        (['accuracy', 'size_bytes'], ['maximize', 'minimize'])
        >>> obj.feasible({"accuracy_drop": 0.02})
        False
        >>> Objective(["accuracy", "size_bytes"], weights={"accuracy": 1.0, "size_bytes": 1e-6}
        ...           ).scalarize({"accuracy": 0.9, "size_bytes": 1e5})
        0.8
    """

    metrics: Sequence[Metric | str]
    constraints: Sequence[Constraint | str] = field(default_factory=list)
    weights: Mapping[str, float] | None = None
    score_runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.score_runtime not in SCORE_RUNTIMES:
            raise ConfigError(
                f"score_runtime={self.score_runtime!r} is unknown: use one of "
                f"{list(SCORE_RUNTIMES)}"
            )
        if isinstance(self.metrics, str | Metric):
            self.metrics = [self.metrics]
        if not self.metrics:
            raise ConfigError(
                "objective needs at least one metric, e.g. ['accuracy', 'size_bytes']"
            )
        resolved = [get_metric(m) for m in self.metrics]
        names = [m.name for m in resolved]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"objective lists metric(s) {dup} twice: list each once")
        bad = sorted(set(names) & (RESERVED | set(DERIVED)))
        if bad:
            raise ConfigError(f"metric name(s) {bad} are reserved by the search: rename them")
        self.metrics = resolved
        if isinstance(self.constraints, str | Constraint):
            self.constraints = [self.constraints]
        parsed = [Constraint.parse(c) for c in self.constraints]
        for c in parsed:
            if c.metric not in set(names) | set(DERIVED) and not is_metric_name(c.metric):
                allowed = sorted(set(metric_names()) | set(names) | set(DERIVED))
                raise ConfigError(
                    f"constraint {str(c)!r} names unknown metric {c.metric!r}: "
                    f"use one of {allowed} or a latency name like 'latency_ms_b1'"
                )
        self.constraints = parsed
        if self.weights is not None:
            w = dict(self.weights)
            unknown = sorted(set(w) - set(names))
            if unknown:
                raise ConfigError(
                    f"weights name metric(s) {unknown} not in the objective: use some of {names}"
                )
            for k, v in w.items():
                if not (isinstance(v, int | float) and math.isfinite(v)):
                    raise ConfigError(f"weight of {k!r} is {v!r}: use a finite number")
            if not w:
                raise ConfigError("weights is empty: give at least one {metric: weight}")
            self.weights = w

    @classmethod
    def default(cls) -> Objective:
        """Maximize accuracy, minimize artifact bytes, accuracy drop at most one point.

        Example:
            >>> [str(c) for c in Objective.default().constraints]
            ['accuracy_drop <= 0.01']
        """
        return cls(["accuracy", "size_bytes"], ["accuracy_drop <= 0.01"])

    # --- description -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Metric names, in order."""
        return [m.name for m in self.metrics]  # type: ignore[union-attr]

    @property
    def directions(self) -> list[str]:
        """``"maximize"``/``"minimize"`` per metric."""
        return [m.direction for m in self.metrics]  # type: ignore[union-attr]

    @property
    def search_metrics(self) -> tuple[list[str], list[str]]:
        """What the sampler optimizes: ``(names, Ray modes)``; ``(["score"], ["max"])`` if
        weighted."""
        if self.weights:
            return ["score"], ["max"]
        return self.names, ["max" if d == "maximize" else "min" for d in self.directions]

    def score_floor(self, teacher_score: float | None) -> float | None:
        """The lowest task score (``accuracy``) a feasible candidate can have, or None.

        From ``accuracy_drop <= b`` (teacher score minus ``b``) and ``accuracy >= b``.

        Example:
            >>> Objective(["accuracy", "size_bytes"], ["accuracy_drop <= 0.01"]).score_floor(0.97)
            0.96
        """
        floors = []
        for c in cast("list[Constraint]", self.constraints):  # parsed in __post_init__
            if c.metric == "accuracy_drop" and c.op == "<=" and teacher_score is not None:
                floors.append(teacher_score - c.bound)
            elif c.metric == "accuracy" and c.op == ">=":
                floors.append(c.bound)
        return round(max(floors), 12) if floors else None

    @property
    def log_scaled(self) -> list[str]:
        """Search metrics the sampler sees as ``log10`` (see :attr:`Metric.scale`).

        Example:
            >>> Objective(["accuracy", "size_bytes"]).log_scaled
            ['size_bytes']
        """
        if self.weights:
            return []
        return [m.name for m in self.metrics if m.scale == "log"]  # type: ignore[union-attr]

    def describe(self) -> dict[str, Any]:
        """Plain-data description (stored in ``run.json`` and ``result.json``)."""
        return {
            "metrics": [
                {"name": n, "direction": d}
                for n, d in zip(self.names, self.directions, strict=True)
            ],
            "constraints": [str(c) for c in self.constraints],
            "weights": dict(self.weights) if self.weights else None,
            # only when set: run.json files written before it still resume
            **({"score_runtime": self.score_runtime} if self.score_runtime != "torch" else {}),
        }

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(
        self,
        model: nn.Module,
        artifact: Artifact,
        task: Task,
        split: str = "val",
        reference: Reference | None = None,
    ) -> dict[str, float]:
        """Every metric of ``model`` (whose exported form is ``artifact``) on ``split``.

        Besides the objective's metrics the result always holds ``accuracy`` and
        ``size_bytes``, ``compression_ratio`` when ``reference.size_bytes`` is known,
        ``accuracy_drop`` when the teacher's score on ``split`` is, every metric a constraint
        names, each metric's ``details`` (e.g. a latency's IQR and the teacher's latency; they
        never replace a metric's own value), and ``score`` when weights are given.
        """
        kw: dict[str, Any] = {"split": split, "reference": reference}
        values: dict[str, float] = {}
        details: dict[str, float] = {}
        if self.score_runtime == "onnxruntime":  # first: it pins the form the others measure
            scored = runtime_scores(
                model,
                artifact,
                task,
                split,
                self.constraints,  # type: ignore[arg-type]
                reference,
                choice_setting(self.metrics),
            )
            values["accuracy"] = scored.pop("accuracy")
            details.update(scored)
        used = [m for m in self.metrics if m.name not in values]  # type: ignore[union-attr]
        for m in used:
            values[m.name] = m(model, artifact, task, **kw)  # type: ignore[operator]
        extra = list(ALWAYS)
        if reference is not None and reference.size_bytes:
            extra.append("compression_ratio")
        extra += [c.metric for c in self.constraints if c.metric not in DERIVED]
        for name in extra:
            if name not in values:
                metric = get_metric(name)
                values[name] = metric(model, artifact, task, **kw)
                used.append(metric)
        for m in used:
            for k, v in m.extra_values(model, artifact, task, **kw).items():  # type: ignore[union-attr]
                details.setdefault(k, v)
        values.update({k: v for k, v in details.items() if k not in values})
        if reference is not None and split in reference.scores:
            values["accuracy_drop"] = float(reference.scores[split]) - values["accuracy"]
        if self.weights:
            values["score"] = self.scalarize(values)
        return values

    def scalarize(self, values: Mapping[str, float]) -> float:
        """``sum(weight * value)`` with minimized metrics negated (higher is better)."""
        if not self.weights:
            raise ConfigError("scalarize needs weights: Objective(..., weights={'accuracy': 1})")
        signs = {m.name: m.sign for m in self.metrics}  # type: ignore[union-attr]
        return float(sum(w * signs[k] * float(values[k]) for k, w in self.weights.items()))

    def constraint_values(self, values: Mapping[str, float]) -> list[float]:
        """Relative violation of each constraint (<= 0 feasible), as Optuna expects them."""
        return [c.value(values) for c in self.constraints]  # type: ignore[union-attr]

    def violation(self, values: Mapping[str, float]) -> float:
        """Sum of positive violations; 0.0 when every constraint holds."""
        return float(sum(max(v, 0.0) for v in self.constraint_values(values)))

    def feasible(self, values: Mapping[str, float]) -> bool:
        """True when every constraint holds."""
        return all(v <= 0.0 for v in self.constraint_values(values))
