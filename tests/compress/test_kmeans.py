from __future__ import annotations

import time

import pytest
import torch

from autocompress.compress._kmeans import kmeans_1d, nearest
from autocompress.compress._quant import CodebookWeight, kmeans_codebook


def matrix_kmeans(v: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """The previous implementation (N x k distance matrix), kept as the reference."""
    v = v.flatten()
    c = torch.linspace(float(v.min()), float(v.max()), k)
    for _ in range(iters):
        assign = torch.argmin((v[:, None] - c[None, :]).abs(), dim=1)
        sums = torch.zeros(k).index_add_(0, assign, v)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones_like(v))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c


def sq_error(v: torch.Tensor, c: torch.Tensor) -> float:
    return float(((v - c[nearest(v, c)]) ** 2).double().sum())


DATA = {
    "gaussian": lambda g: torch.randn(20_000, generator=g) * 0.05,
    "laplace-ish": lambda g: torch.randn(20_000, generator=g) * torch.rand(20_000, generator=g),
    "bimodal": lambda g: torch.cat([torch.randn(5000, generator=g) - 3, torch.rand(300) * 0 + 4]),
    "few distinct": lambda g: torch.randint(0, 5, (3000,), generator=g).float(),
}


@pytest.mark.parametrize("name", sorted(DATA))
@pytest.mark.parametrize("k", [3, 15, 255])
def test_same_or_better_error_than_matrix_kmeans(name: str, k: int) -> None:
    g = torch.Generator().manual_seed(0)
    v = DATA[name](g)
    new, old = kmeans_1d(v, k), matrix_kmeans(v, k)
    assert new.shape == (k,) and new.dtype == torch.float32
    assert torch.all(new[1:] >= new[:-1])  # ascending
    e_new, e_old = sq_error(v, new), sq_error(v, old)
    assert e_new <= e_old * (1 + 1e-5) + 1e-12, (e_new, e_old)
    assert torch.allclose(torch.sort(old).values, new, atol=1e-4)  # the same algorithm


def test_nearest_matches_argmin() -> None:
    g = torch.Generator().manual_seed(1)
    v, c = torch.randn(5000, generator=g), torch.randn(31, generator=g)
    ref = torch.argmin((v[:, None] - c[None, :]).abs(), dim=1)
    assert torch.equal(nearest(v, c), ref)
    assert nearest(v.reshape(50, 100), c).shape == (50, 100)


def test_edge_cases() -> None:
    assert torch.equal(kmeans_1d(torch.empty(0), 4), torch.zeros(4))
    same = kmeans_1d(torch.full((10,), 2.5), 3)
    assert same[0] == 2.5  # all values join the first cluster, the others keep their start
    assert torch.equal(kmeans_codebook(torch.tensor([1.0, 3.0]), 2), torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="k=0"):
        kmeans_1d(torch.ones(3), 0)


def test_codebook_weight_uses_it() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    mask = (torch.rand(64, 32) > 0.5).float()
    cw = CodebookWeight(mask, w * mask, bits=3)
    assert torch.allclose(cw.centroids.detach(), kmeans_1d((w * mask)[mask.bool()], 7))
    out = cw(w)
    assert bool((out[mask == 0] == 0).all())
    assert set(out[mask == 1].unique().tolist()) <= set(cw.centroids.tolist())
    assert cw.table().device == w.device


def test_one_million_weights_at_k255() -> None:
    v = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    c = kmeans_1d(v, 255)
    secs = time.perf_counter() - t0
    print(f"\nkmeans_1d: 1M weights, k=255, 25 iterations max: {secs:.2f} s")
    assert c.shape == (255,) and torch.isfinite(c).all()
    sub = v[:20_000]
    assert sq_error(sub, c) < sq_error(sub, torch.linspace(float(v.min()), float(v.max()), 255))
