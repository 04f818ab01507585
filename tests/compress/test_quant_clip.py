"""Clipped scales (``compress._quant.clipped_scale``): never more rounding error than the
``max|w|`` grid, much less at 2-3 bits, fp16-exact, the layout ``uniform_scale`` has."""

from __future__ import annotations

import pytest
import torch

from autocompress.compress._meta import fp16_exact
from autocompress.compress._quant import (
    clipped_scale,
    scale_grid,
    uniform_codes,
    uniform_scale,
)


def _err(w: torch.Tensor, s: torch.Tensor, bits: int, axis: int, group: int) -> torch.Tensor:
    """Squared rounding error per scale (per channel, or per channel and group)."""
    v = uniform_codes(w, s, bits, axis, group) * scale_grid(s, w, axis, group)
    e = (v - w).movedim(axis, 0).reshape(w.shape[axis], -1) ** 2
    if not group:
        return e.sum(dim=1)
    pad = -e.shape[1] % group
    return torch.nn.functional.pad(e, (0, pad)).reshape(e.shape[0], -1, group).sum(dim=2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("axis", "group"), [(0, 0), (0, 16), (1, 0), (1, 32)])
def test_never_worse_than_the_max_grid_and_same_layout(bits: int, axis: int, group: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 40, generator=g) * 0.05
    w[3, 7] = 1.0  # one outlier: the max grid wastes its levels on it
    amax, clip = uniform_scale(w, bits, axis, group), clipped_scale(w, bits, axis, group)
    assert clip.shape == amax.shape
    assert torch.equal(fp16_exact(clip), clip)
    assert bool((clip <= amax).all())
    e_amax, e_clip = _err(w, amax, bits, axis, group), _err(w, clip, bits, axis, group)
    assert bool((e_clip <= e_amax).all())


def test_low_bits_on_gaussian_weights_lose_far_less() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    for bits, most in ((2, 0.6), (3, 0.8)):
        a = _err(w, uniform_scale(w, bits), bits, 0, 0).sum()
        c = _err(w, clipped_scale(w, bits), bits, 0, 0).sum()
        assert c < most * a, (bits, float(c / a))


def test_all_zero_channels_keep_the_smallest_scale() -> None:
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    s = clipped_scale(w, 3)
    assert torch.equal(s[[0, 2]], uniform_scale(w, 3)[[0, 2]])
