"""Pareto fronts and hypervolume over trials' metric values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LOG_SCALE = frozenset({"size_bytes", "params", "compression_ratio", "latency_ms", "macs", "bitops"})
"""Metrics spanning orders of magnitude: compared on a log10 scale in the hypervolume."""


def _signs(directions: Sequence[str], n: int) -> np.ndarray:
    if len(directions) != n:
        raise ValueError(f"{len(directions)} directions for {n} metric columns: give one each")
    signs = []
    for d in directions:
        d = str(d).lower()
        if d in ("maximize", "max"):
            signs.append(-1.0)
        elif d in ("minimize", "min"):
            signs.append(1.0)
        else:
            raise ValueError(f"direction {d!r} is unknown: use 'maximize' or 'minimize'")
    return np.asarray(signs)


def to_losses(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """``values`` (n, m) as losses to minimize: maximized columns negated."""
    v = np.array(values, dtype=float, copy=True, ndmin=2)
    return v * _signs(directions, v.shape[1])


def non_dominated(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows of ``values`` (n trials x m metrics) no other row dominates.

    Row ``a`` dominates ``b`` when it is at least as good in every metric and strictly better in
    one. Rows with a NaN or infinite value are never in the front; equal rows are all kept.

    Example:
        >>> non_dominated(np.array([[0.9, 100], [0.8, 50], [0.8, 120]]),
        ...               ["maximize", "minimize"]).tolist()
        [True, True, False]
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"values must be a 2-D array (trials x metrics), got shape {v.shape}")
    n = v.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    loss = to_losses(v, directions)
    finite = np.isfinite(loss).all(axis=1)
    mask = finite.copy()
    f = loss[finite]
    idx = np.flatnonzero(finite)
    # le[i, j]: row j is <= row i everywhere; lt[i, j]: strictly better somewhere.
    le = (f[None, :, :] <= f[:, None, :]).all(axis=2)
    lt = (f[None, :, :] < f[:, None, :]).any(axis=2)
    dominated = (le & lt).any(axis=1)
    mask[idx[dominated]] = False
    return mask


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume (to minimize) of ``points`` bounded by ``ref``."""
    inside = points[(points < ref).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    if inside.shape[1] == 1:
        return float(ref[0] - inside[:, 0].min())
    try:
        from optuna._hypervolume import compute_hypervolume
    except ImportError:  # pragma: no cover - optuna moved it; fall back to 2-D only
        compute_hypervolume = None
    if compute_hypervolume is not None:
        return float(compute_hypervolume(inside, ref))
    if inside.shape[1] != 2:
        raise RuntimeError("hypervolume in > 2 dimensions needs optuna._hypervolume")
    return hv2d(inside, ref)


def hv2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume (losses, bounded by ``ref``) by a staircase sweep.

    Example:
        >>> hv2d(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([2.0, 2.0]))
        3.0
    """
    pts = points[(points < ref).all(axis=1)]
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    hv, best_y = 0.0, float(ref[1])
    xs = [*pts[:, 0].tolist(), float(ref[0])]
    for k in range(len(pts)):
        best_y = min(best_y, float(pts[k, 1]))
        hv += (xs[k + 1] - xs[k]) * (float(ref[1]) - best_y)
    return float(hv)


def hypervolume_history(
    values: np.ndarray, directions: Sequence[str], names: Sequence[str] | None = None
) -> np.ndarray:
    """Hypervolume of the front of the first ``k`` rows, for every ``k``.

    Losses are normalized to [0, 1] per metric over all rows (log10 first for metrics in
    :data:`LOG_SCALE`), and the reference point is 1.1 in every dimension, so the history
    is comparable between metrics and never decreases. Rows with NaN (e.g. failed or infeasible
    trials, masked by the caller) add nothing.

    Example:
        >>> h = hypervolume_history(np.array([[0.5, 100.0], [0.9, 1000.0], [0.9, 100.0]]),
        ...                         ["maximize", "minimize"], ["accuracy", "size_bytes"])
        >>> bool(h[0] <= h[1] <= h[2])
        True
    """
    v = np.array(values, dtype=float, copy=True, ndmin=2)
    n, m = v.shape
    out = np.zeros(n)
    if n == 0:
        return out
    names = list(names or [""] * m)
    for j, name in enumerate(names):
        col = v[:, j]
        ok = np.isfinite(col)
        if name in LOG_SCALE and ok.any() and (col[ok] > 0).all():
            v[ok, j] = np.log10(col[ok])
    loss = to_losses(v, directions)
    ok = np.isfinite(loss).all(axis=1)
    if not ok.any():
        return out
    lo, hi = loss[ok].min(axis=0), loss[ok].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = (loss - lo) / span
    ref = np.full(m, 1.1)
    for k in range(n):
        pts = norm[: k + 1][ok[: k + 1]]
        out[k] = _hv(pts[non_dominated(pts, ["minimize"] * m)], ref) if len(pts) else 0.0
    return out
