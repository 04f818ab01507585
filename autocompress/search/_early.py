"""Early stopping of hopeless candidates: a fine-tune that cannot reach a feasible score stops.

Successive halving (ASHA) ranks trials by one metric and so prunes exactly the small, slightly
less accurate candidates a size/accuracy search is after (measured: docs/search-quality.md). The
rule here only uses the constraint: a candidate whose best val score, after a fraction of its
fine-tune (and never before the pruning ramp is complete), is more than ``margin`` below the
lowest feasible score stops there. It is still recorded, COMPLETE, with the score it reached
(infeasible by construction) and the epoch it stopped at; the sampler learns that the region is
bad, and the front, made of feasible candidates only, is unaffected unless such a candidate
would have gained more than ``margin`` in the rest of its fine-tune.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from autocompress.errors import ConfigError


@dataclass(frozen=True)
class EarlyStop:
    """When to stop a candidate's fine-tune early (``search.run(early_stop=...)``).

    Args:
        after: fraction of the planned epochs to run before judging (0 < after <= 1).
        margin: how far below the lowest feasible task score (teacher val score minus the
            ``accuracy_drop`` budget, or an ``accuracy >=`` bound) the best val score so far
            must be to stop, in task-score units (0.05 = 5 accuracy points).

    Example:
        >>> stop = EarlyStop(after=0.25, margin=0.05).rule(floor=0.96, epochs=40)
        >>> stop(5, 0.50), stop(10, 0.90), stop(10, 0.93)
        (False, True, False)
    """

    after: float = 0.34
    margin: float = 0.05

    def __post_init__(self) -> None:
        if not (isinstance(self.after, int | float) and 0 < self.after <= 1):
            raise ConfigError(f"early_stop after={self.after!r} must be a fraction in (0, 1]")
        if not (isinstance(self.margin, int | float) and 0 <= self.margin < 1):
            raise ConfigError(f"early_stop margin={self.margin!r} must be in [0, 1)")

    def rule(self, floor: float, epochs: int) -> Callable[[int, float], bool]:
        """``stop(epochs_run, best_val)`` for a fine-tune of ``epochs`` epochs."""
        first = max(1, math.ceil(self.after * epochs))
        limit = floor - self.margin
        return lambda done, best: done >= first and best < limit
