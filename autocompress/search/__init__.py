"""Search: Ray Tune + Optuna over compression plans, Pareto front, SearchResult.

Example:
    >>> from autocompress.search import non_dominated
    >>> non_dominated([[0.9, 10.0], [0.8, 20.0]], ["maximize", "minimize"]).tolist()
    [True, False]
"""

from __future__ import annotations

from autocompress.search._common import SAMPLERS
from autocompress.search._driver import run
from autocompress.search._early import EarlyStop
from autocompress.search._pareto import hypervolume_history, non_dominated
from autocompress.search._result import SearchResult

__all__ = [
    "SAMPLERS",
    "EarlyStop",
    "SearchResult",
    "hypervolume_history",
    "non_dominated",
    "run",
]
