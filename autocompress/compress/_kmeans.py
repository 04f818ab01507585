"""k-means in one dimension by sorting: O(N log N) time, O(N) memory, any device.

In 1-D every k-means cluster is an interval of the sorted values, cut at the midpoints between
consecutive centroids. So the values are sorted once; each Lloyd iteration finds the k - 1 cuts
with ``searchsorted`` and every cluster's sum as a difference of one prefix sum (float64, so the
means are as exact as a direct sum). No N x k distance matrix is ever built: 10M weights at
k = 255 need a few hundred MB instead of tens of GB. Same algorithm as the matrix version
(Deep Compression's linear initialization, an empty cluster keeps its centroid, a value exactly
between two centroids joins the lower one), so the same centroids up to float rounding.
"""

from __future__ import annotations

import torch


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """``k`` centroids (float32, ascending, on ``values``' device) of the 1-D ``values``.

    Lloyd's algorithm from ``k`` evenly spaced centroids between the min and max; stops early
    once the assignment no longer changes (it would not move again).

    Example:
        >>> kmeans_1d(torch.tensor([0.0, 0.1, 0.9, 1.0]), 2).tolist()
        [0.05000000074505806, 0.949999988079071]
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    v = values.detach().reshape(-1)
    if v.numel() == 0:
        return torch.zeros(k, device=v.device)
    v = torch.sort(v.float()).values
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64, device=v.device), v.double().cumsum(0)])
    c = torch.linspace(float(v[0]), float(v[-1]), k, device=v.device)
    cuts = None
    for _ in range(iters):
        # cluster j holds the sorted values in [cuts[j], cuts[j + 1])
        mids = (c[1:] + c[:-1]) / 2
        inner = torch.searchsorted(v, mids, right=True)  # v == mid joins the lower cluster
        new = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), v.numel())])
        if cuts is not None and torch.equal(new, cuts):
            break
        cuts = new
        counts = (cuts[1:] - cuts[:-1]).double()
        sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c.double()).float()
    return c


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of every value (int64, ``values``' shape), by sorting.

    The centroids need not be sorted; a value exactly between two centroids gets the lower
    one. O(N log k) time and O(N) memory.

    Example:
        >>> nearest(torch.tensor([0.0, 0.45, 0.55, 2.0]), torch.tensor([1.0, 0.0])).tolist()
        [1, 1, 0, 0]
    """
    c = centroids.detach().reshape(-1).float()
    order = torch.argsort(c, stable=True)
    sc = c[order]
    mids = (sc[1:] + sc[:-1]) / 2
    pos = torch.searchsorted(mids, values.detach().float().contiguous(), right=False)
    return order[pos]
