"""Constraints such as ``"accuracy_drop <= 0.01"`` and their Optuna value (<= 0 is feasible)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from autocompress.errors import ConfigError

OPS = ("<=", ">=")
DERIVED = ("accuracy_drop",)
"""Metrics computed from others: ``accuracy_drop = teacher accuracy - candidate accuracy``."""

_PATTERN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>|==|=)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Constraint:
    """``metric op bound`` with ``op`` in ``<=``, ``>=``.

    :meth:`value` is the relative violation: ``(value - bound) / |bound|`` for ``<=`` and
    ``(bound - value) / |bound|`` for ``>=`` (divided by 1 when ``bound`` is 0). It is <= 0 exactly
    when the constraint holds, which is Optuna's convention for ``trial.set_constraint``; the
    relative scale keeps a byte budget and an accuracy budget comparable when NSGA-II sums them.

    Example:
        >>> c = Constraint.parse("accuracy_drop <= 0.01")
        >>> c.value({"accuracy_drop": 0.005}) <= 0, c.value({"accuracy_drop": 0.02}) > 0
        (True, True)
        >>> str(c)
        'accuracy_drop <= 0.01'
    """

    metric: str
    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"constraint operator {self.op!r} is not supported: use <= or >=")
        if not (isinstance(self.bound, int | float) and math.isfinite(self.bound)):
            raise ConfigError(f"constraint bound {self.bound!r} must be a finite number")
        object.__setattr__(self, "bound", float(self.bound))

    @classmethod
    def parse(cls, text: str | Constraint, allowed: Iterable[str] | None = None) -> Constraint:
        """Parse ``"name <= number"``; with ``allowed``, refuse unknown metric names.

        Example:
            >>> Constraint.parse("size_bytes <= 50_000").bound
            50000.0
        """
        if isinstance(text, Constraint):
            c = text
        else:
            m = _PATTERN.match(str(text))
            if m is None:
                raise ConfigError(
                    f"constraint {text!r} is not 'metric <= number' or 'metric >= number'"
                )
            name, op, raw = m.groups()
            if op not in OPS:
                raise ConfigError(f"constraint {text!r}: operator {op!r} unsupported: use <= or >=")
            try:
                bound = float(raw)
            except ValueError:
                raise ConfigError(
                    f"constraint {text!r}: bound {raw!r} is not a number, e.g. 0.01 or 50000"
                ) from None
            c = cls(name, op, bound)
        if allowed is not None:
            names = sorted(set(allowed))
            if c.metric not in names:
                raise ConfigError(
                    f"constraint {str(c)!r} names unknown metric {c.metric!r}: use one of {names}"
                )
        return c

    def value(self, values: Mapping[str, float]) -> float:
        """Relative violation (<= 0 feasible); ``inf`` if the metric is missing or not finite."""
        v = values.get(self.metric)
        if v is None or not math.isfinite(v):
            return math.inf
        scale = abs(self.bound) if abs(self.bound) > 1e-12 else 1.0
        diff = v - self.bound if self.op == "<=" else self.bound - v
        return diff / scale

    def satisfied(self, values: Mapping[str, float]) -> bool:
        """True when the constraint holds for ``values``."""
        return self.value(values) <= 0.0

    def __str__(self) -> str:
        b = self.bound
        text = str(int(b)) if b.is_integer() and abs(b) < 1e15 else repr(b)
        return f"{self.metric} {self.op} {text}"
