"""k-bit weight quantization: per-channel uniform or shared-weight codebook (Deep Compression).

During fine-tuning each compressed weight is a parametrization (``torch.nn.utils.parametrize``)
that applies the pruning mask and fake quantization with a straight-through estimator, so the
mask is kept and the network learns around the quantization error. ``bake`` then writes the exact
values the artifact stores and attaches a :class:`QuantRecord` per weight.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress._meta import QuantRecord, fp16_exact, quant_records, set_quant_records
from autocompress.compress._targets import layer_modules
from autocompress.spaces._plan import LayerPlan, Plan

_MIN_SCALE = 2.0**-14  # smallest normal fp16 value


def qmax(bits: int) -> int:
    """Largest code magnitude of the symmetric ``bits``-bit grid (2 bits: ternary)."""
    return max(1, 2 ** (bits - 1) - 1)


def uniform_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale ``max|w| / qmax``, fp16-exact."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    return fp16_exact(torch.clamp(amax / qmax(bits), min=_MIN_SCALE))


def _bshape(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, *([1] * (w.dim() - 1)))


def uniform_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid ``q * scale``."""
    m = qmax(bits)
    return torch.clamp(torch.round(w / _bshape(scale, w)), -m, m)


def kmeans_codebook(values: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """``k`` centroids of 1-D ``values`` (linear initialization, as in Deep Compression)."""
    v = values.detach().flatten()
    if v.numel() == 0:
        return torch.zeros(k)
    c = torch.linspace(float(v.min()), float(v.max()), k)
    for _ in range(iters):
        assign = torch.argmin((v[:, None] - c[None, :]).abs(), dim=1)
        sums = torch.zeros(k).index_add_(0, assign, v)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones_like(v))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c


class MaskWeight(nn.Module):
    """Keeps pruned entries at zero (fp32 layers). ``target`` is the layer's final sparsity."""

    def __init__(self, mask: torch.Tensor, target: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.target = target

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class Fp16Weight(MaskWeight):
    """Mask, then round to fp16 with a straight-through gradient."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w * self.mask
        return w + (fp16_exact(w) - w).detach()


class UniformFakeQuant(MaskWeight):
    """Mask, then symmetric per-channel fake quantization with a straight-through gradient."""

    def __init__(self, mask: torch.Tensor, target: float, bits: int) -> None:
        super().__init__(mask, target)
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w * self.mask
        s = _bshape(uniform_scale(w, self.bits), w)
        x = w / s
        q = x + (torch.clamp(torch.round(x), -qmax(self.bits), qmax(self.bits)) - x).detach()
        return q * s


class PendingCodebook(MaskWeight):
    """A codebook layer before clustering: trained as a pruned fp32 layer first (Deep
    Compression prunes and retrains, then clusters), converted by :func:`convert_codebooks`."""

    def __init__(self, mask: torch.Tensor, target: float, bits: int) -> None:
        super().__init__(mask, target)
        self.bits = bits


class _Gather(torch.autograd.Function):
    """``table[assign]`` whose backward sums gradients per centroid with ``index_add_``
    (much faster on CPU than the generic indexing backward)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(assign)
        ctx.k = table.numel()
        return table[assign]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (assign,) = ctx.saved_tensors
        g = torch.zeros(ctx.k, dtype=grad.dtype).index_add_(0, assign.flatten(), grad.flatten())
        return g, None


class CodebookWeight(MaskWeight):
    """Shared weights: ``codebook[assign]`` with trainable centroids (code 0 is fixed at 0)."""

    def __init__(self, mask: torch.Tensor, w: torch.Tensor, bits: int) -> None:
        super().__init__(mask, 0.0)
        nz = w.detach()[mask.bool()]
        k = 2**bits - 1
        cents = kmeans_codebook(nz, k) if nz.numel() else torch.zeros(k)
        self.centroids = nn.Parameter(cents)
        assign = torch.argmin((w.detach().reshape(-1, 1) - cents[None, :]).abs(), dim=1) + 1
        self.register_buffer("assign", (assign.reshape(w.shape) * mask.long()))

    def table(self) -> torch.Tensor:
        return torch.cat([torch.zeros(1), self.centroids])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(self.table(), self.assign) * self.mask


def _parametrization(lp: LayerPlan, mask: torch.Tensor) -> MaskWeight | None:
    if lp.bits == 32:
        return MaskWeight(mask, lp.sparsity) if lp.sparsity > 0 else None
    if lp.bits == 16:
        return Fp16Weight(mask, lp.sparsity)
    if lp.scheme == "codebook":
        return PendingCodebook(mask, lp.sparsity, lp.bits)
    return UniformFakeQuant(mask, lp.sparsity, lp.bits)


def _parametrized(model: nn.Module) -> list[tuple[str, nn.Module, MaskWeight]]:
    return [
        (fqn, mod, mod.parametrizations.weight[0])
        for fqn, mod in model.named_modules()
        if parametrize.is_parametrized(mod, "weight")
    ]


def attach(model: nn.Module, plan: Plan, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Register mask/fake-quant parametrizations on ``model`` in place, per the plan.

    ``masks`` (module fqn -> 0/1 tensor) fixes the initial masks; by default every layer starts
    dense and :func:`set_sparsity` prunes it (gradually during fine-tune, or at once).
    """
    masks = masks or {}
    for name, lp in plan.layers.items():
        for fqn, mod in layer_modules(model, name):
            mask = masks.get(fqn, torch.ones_like(mod.weight)).detach()
            with torch.no_grad():
                mod.weight.mul_(mask)
            p = _parametrization(lp, mask)
            if p is not None:
                parametrize.register_parametrization(mod, "weight", p)
    return model


def set_sparsity(model: nn.Module, fraction: float = 1.0) -> None:
    """Re-derive every prunable layer's magnitude mask at ``fraction`` of its target sparsity.

    Used for gradual magnitude pruning (Zhu & Gupta, 2017); ``fraction=1`` reaches each layer's
    exact planned sparsity. Codebook layers already clustered keep their masks.
    """
    from autocompress.compress._prune import magnitude_mask

    for _, mod, p in _parametrized(model):
        if isinstance(p, CodebookWeight) or p.target <= 0:
            continue
        w = mod.parametrizations.weight.original
        p.mask.copy_(magnitude_mask(w, p.target * fraction))


def has_pending_codebooks(model: nn.Module) -> bool:
    """Whether some codebook layer has not been clustered yet."""
    return any(isinstance(p, PendingCodebook) for _, _, p in _parametrized(model))


def convert_codebooks(model: nn.Module) -> None:
    """Cluster every pending codebook layer's (masked) weights into its codebook, in place."""
    for _, mod, p in _parametrized(model):
        if not isinstance(p, PendingCodebook):
            continue
        with torch.no_grad():
            w = mod.parametrizations.weight.original.detach() * p.mask
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        with torch.no_grad():
            mod.weight.copy_(w)
        parametrize.register_parametrization(mod, "weight", CodebookWeight(p.mask, w, p.bits))


def bake(model: nn.Module) -> nn.Module:
    """Replace every parametrization by the exact stored values and attach quant records."""
    convert_codebooks(model)
    records = dict(quant_records(model))
    for fqn, mod in list(model.named_modules()):
        if not parametrize.is_parametrized(mod, "weight"):
            continue
        p = mod.parametrizations.weight[0]
        with torch.no_grad():
            w = mod.parametrizations.weight.original.detach() * p.mask
            if isinstance(p, CodebookWeight):
                table = fp16_exact(p.table())
                value = table[p.assign] * p.mask
                bits = (len(table) - 1).bit_length()  # len(table) == 2**bits
                rec = QuantRecord(bits, "codebook", codebook=table)
            elif isinstance(p, UniformFakeQuant):
                scale = uniform_scale(w, p.bits)
                value = uniform_codes(w, scale, p.bits) * _bshape(scale, w)
                rec = QuantRecord(p.bits, "uniform", scale=scale)
            elif isinstance(p, Fp16Weight):
                value, rec = fp16_exact(w), QuantRecord(16, "fp16")
            else:
                value, rec = w, None
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        with torch.no_grad():
            mod.weight.copy_(value)
            if rec is not None and getattr(mod, "bias", None) is not None:
                mod.bias.copy_(fp16_exact(mod.bias))
        if rec is not None:
            records[f"{fqn}.weight"] = rec
    set_quant_records(model, records)
    return model
