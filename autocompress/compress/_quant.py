"""k-bit weight quantization: per-channel uniform or shared-weight codebook (Deep Compression).

During fine-tuning each compressed weight is a parametrization (``torch.nn.utils.parametrize``)
that applies the pruning mask and fake quantization with a straight-through estimator, so the
mask is kept and the network learns around the quantization error. ``bake`` then writes the exact
values the artifact stores and attaches a :class:`QuantRecord` per weight.

Weights are found by :func:`autocompress.compress._prune.weight_targets`, so module weights
(``Linear``, ``Conv``, ``Embedding``, HF ``Conv1D``) and parameter-level weights (RNN
``weight_ih_l0``..., ``nn.MultiheadAttention.in_proj_weight``) are handled alike: the
parametrization sits on the module attribute holding the tensor, and ``state_dict`` keys are
unchanged after :func:`bake`. A tied tensor gets ONE parametrization object registered on every
module holding it, so all aliases see the same masked, quantized value during fine-tuning and the
same ``nn.Parameter`` object after baking.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from autocompress.compress._meta import QuantRecord, fp16_exact, quant_records, set_quant_records
from autocompress.compress._prune import plan_targets
from autocompress.spaces._plan import LayerPlan, Plan

_MIN_SCALE = 2.0**-14  # smallest normal fp16 value


def qmax(bits: int) -> int:
    """Largest code magnitude of the symmetric ``bits``-bit grid (2 bits: ternary)."""
    return max(1, 2 ** (bits - 1) - 1)


def as_rows(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``w`` as ``(out, n_in)``: the output channels (dim ``axis``) first, every other dim
    flattened in its natural order (the layout group-wise scales follow)."""
    m = w.movedim(axis, 0) if axis else w
    return m.reshape(m.shape[0], -1) if m.dim() else m.reshape(1, 1)


def from_rows(rows: torch.Tensor, like: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """The inverse of :func:`as_rows`: ``rows`` back in the shape of ``like``."""
    shape = list(like.shape)
    moved = [shape[axis], *shape[:axis], *shape[axis + 1 :]] if shape else shape
    out = rows.reshape(moved)
    return out.movedim(0, axis) if axis else out


def _group_amax(rows: torch.Tensor, group: int) -> torch.Tensor:
    """``max |rows|`` over each run of ``group`` columns (the last run may be partial)."""
    n = rows.shape[1]
    pad = -n % group
    a = rows.abs()
    if pad:
        a = torch.cat([a, a.new_zeros(a.shape[0], pad)], dim=1)
    return a.reshape(a.shape[0], -1, group).amax(dim=2)


def uniform_scale(w: torch.Tensor, bits: int, axis: int = 0, group: int = 0) -> torch.Tensor:
    """Scales ``max|w| / qmax``, fp16-exact: one per output channel (dim ``axis``), or with
    ``group > 0`` one per ``group`` consecutive weights along the input dimension, shape
    ``(out, ceil(n_in / group))`` (see ``compress._meta``).

    Example:
        >>> uniform_scale(torch.tensor([[1.0, -4.0], [0.5, 2.0]]), 4, axis=1).tolist()
        [0.142822265625, 0.5712890625]
        >>> uniform_scale(torch.arange(1.0, 33.0).reshape(1, 32), 4, group=16).tolist()
        [[2.28515625, 4.5703125]]
    """
    rows = as_rows(w.detach(), axis)
    amax = _group_amax(rows, group) if group else rows.abs().amax(dim=1)
    return fp16_exact(torch.clamp(amax / qmax(bits), min=_MIN_SCALE))


CLIP_STEPS = 24
"""Shrink factors tried by :func:`clipped_scale`: ``1, 0.97, ..., 0.31``."""
CLIP_STEP = 0.03
_CLIP_ROWS = 2048
"""Rows per chunk of :func:`clipped_scale` (stays in cache; bounds the temporary memory)."""


def clipped_scale(
    w: torch.Tensor, bits: int, axis: int = 0, group: int = 0, *, steps: int = CLIP_STEPS
) -> torch.Tensor:
    """Scales like :func:`uniform_scale` but clipped: each channel's (or group's) scale is
    ``p * max|w| / qmax`` with the shrink ``p`` in ``1, 0.97, ..., 0.31`` minimizing the
    squared rounding error ``sum (round(w / s) * s - w) ** 2`` of its weights (the ``mse``
    grid search of GPTQ's reference ``Quantizer.find_params``, Frantar et al. 2022). At 2-3
    bits the ``max|w|`` grid spends its few levels on the largest weights; clipping them cuts
    the error by a third (3 bits) to two thirds (2 bits) on Gaussian-like weights.

    Same shape and fp16-exactness as :func:`uniform_scale`; ``p = 1`` (no clipping) is always a
    candidate, so the error is never larger than the ``max|w|`` grid's.

    Example:
        >>> w = torch.linspace(-1.0, 1.0, 9)[None]  # a ternary grid: step 1.0 -> 0.76
        >>> clipped_scale(w, 2).tolist(), uniform_scale(w, 2).tolist()
        ([0.759765625], [1.0])
    """
    top = qmax(bits)
    rows = as_rows(w.detach(), axis).float()
    g = group or rows.shape[1]
    pad = -rows.shape[1] % g
    blocks = F.pad(rows, (0, pad)).reshape(rows.shape[0], -1, g)  # padding: zeros, no error
    out = torch.empty(blocks.shape[:2], dtype=torch.float32, device=blocks.device)
    for r in range(0, blocks.shape[0], _CLIP_ROWS):
        b = blocks[r : r + _CLIP_ROWS]
        amax = b.abs().amax(dim=2)
        best_s = fp16_exact(torch.clamp(amax / top, min=_MIN_SCALE))
        best_e: torch.Tensor | None = None
        for i in range(steps):
            s = (
                best_s
                if i == 0
                else fp16_exact((amax * (1 - i * CLIP_STEP) / top).clamp(min=_MIN_SCALE))
            )
            q = (b / s[..., None]).round_().clamp_(-top, top).mul_(s[..., None]).sub_(b)
            err = q.square_().sum(dim=2)
            if best_e is None:
                best_e = err
                continue
            better = err < best_e
            best_e = torch.where(better, err, best_e)
            best_s = torch.where(better, s, best_s)
        out[r : r + _CLIP_ROWS] = best_s
    return out if group else out[:, 0]


def scale_grid(scale: torch.Tensor, w: torch.Tensor, axis: int = 0, group: int = 0) -> torch.Tensor:
    """``scale`` broadcastable against ``w``: per channel along ``axis``, or (``group > 0``)
    expanded to one scale per weight."""
    if not group:
        shape = [1] * w.dim()
        shape[axis] = -1
        return scale.reshape(shape)
    n_in = w.numel() // max(1, w.shape[axis])
    full = scale.repeat_interleave(group, dim=1)[:, :n_in]
    return from_rows(full, w, axis)


def uniform_codes(
    w: torch.Tensor, scale: torch.Tensor, bits: int, axis: int = 0, group: int = 0
) -> torch.Tensor:
    """Integer codes of ``w`` on the grid ``q * scale`` (scales along dim ``axis``, per
    ``group`` input weights when ``group > 0``)."""
    m = qmax(bits)
    return torch.clamp(torch.round(w / scale_grid(scale, w, axis, group)), -m, m)


def kmeans_codebook(values: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """``k`` centroids of 1-D ``values`` (linear initialization, as in Deep Compression)."""
    from autocompress.compress._kmeans import kmeans_1d  # by sorting: O(N) memory

    return kmeans_1d(values, k, iters)


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
    """Mask, then symmetric fake quantization with a straight-through gradient.

    ``axis`` is the output-channel dimension (1 for HF ``Conv1D``); ``group > 0`` gives one
    scale per ``group`` consecutive input weights of a channel. Scales follow the weights
    (``max|w| / qmax``) unless :meth:`fix_scale` pinned them (GPTQ chose them: the fine-tune
    then starts exactly from GPTQ's rounding and bake stores those scales).
    """

    def __init__(
        self, mask: torch.Tensor, target: float, bits: int, axis: int = 0, group: int = 0
    ) -> None:
        super().__init__(mask, target)
        self.bits = bits
        self.axis = axis
        self.group = group
        self.fixed: torch.Tensor | None = None

    def fix_scale(self, scale: torch.Tensor) -> None:
        """Pin the scales (fp16-exact, the shape :func:`uniform_scale` gives)."""
        self.fixed = fp16_exact(scale)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The scales of the (masked) weight ``w``: pinned ones, else ``max|w| / qmax``."""
        if self.fixed is not None:
            return self.fixed.to(w.device)
        return uniform_scale(w, self.bits, self.axis, self.group)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w * self.mask
        if self.group:  # (out, groups, group) views: no per-weight copy of the scales
            rows = as_rows(w, self.axis)
            n, pad = rows.shape[1], -rows.shape[1] % self.group
            blocks = F.pad(rows, (0, pad)).reshape(rows.shape[0], -1, self.group)
            s = self.scale(w)[:, :, None]
            out = _ste_round(blocks / s, self.bits) * s
            return from_rows(out.reshape(rows.shape[0], -1)[:, :n], w, self.axis)
        s = scale_grid(self.scale(w), w, self.axis)
        return _ste_round(w / s, self.bits) * s


def _ste_round(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded onto ``[-qmax, qmax]``, with a straight-through (identity) gradient."""
    return x + (torch.clamp(torch.round(x), -qmax(bits), qmax(bits)) - x).detach()


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
        g = torch.zeros(ctx.k, dtype=grad.dtype, device=grad.device)
        g.index_add_(0, assign.flatten(), grad.flatten())
        return g, None


class CodebookWeight(MaskWeight):
    """Shared weights: ``codebook[assign]`` with trainable centroids (code 0 is fixed at 0)."""

    def __init__(self, mask: torch.Tensor, w: torch.Tensor, bits: int) -> None:
        super().__init__(mask, 0.0)
        nz = w.detach()[mask.bool()]
        k = 2**bits - 1
        cents = kmeans_codebook(nz, k) if nz.numel() else torch.zeros(k, device=w.device)
        self.centroids = nn.Parameter(cents)
        from autocompress.compress._kmeans import nearest

        assign = nearest(w.detach().reshape(-1), cents) + 1
        self.register_buffer("assign", (assign.reshape(w.shape) * mask.long()))

    def table(self) -> torch.Tensor:
        return torch.cat([self.centroids.new_zeros(1), self.centroids])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(self.table(), self.assign) * self.mask


def _parametrization(lp: LayerPlan, mask: torch.Tensor, axis: int) -> MaskWeight | None:
    if lp.bits == 32:
        return MaskWeight(mask, lp.sparsity) if lp.sparsity > 0 else None
    if lp.bits == 16:
        return Fp16Weight(mask, lp.sparsity)
    if lp.scheme == "codebook":
        return PendingCodebook(mask, lp.sparsity, lp.bits)
    return UniformFakeQuant(mask, lp.sparsity, lp.bits, axis, lp.group)


Slot = tuple[str, nn.Module, str]  # (module fqn, module, attribute)


def _parametrized(model: nn.Module) -> list[tuple[MaskWeight, list[Slot]]]:
    """Each of our parametrizations once, with every ``(fqn, module, attribute)`` path to it
    (several when the tensor is tied or a module is reachable under two names)."""
    found: dict[int, tuple[MaskWeight, list[Slot]]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(mod):
            continue
        for attr, plist in mod.parametrizations.items():
            p = plist[0]
            if isinstance(p, MaskWeight):
                found.setdefault(id(p), (p, []))[1].append((fqn, mod, attr))
    return list(found.values())


def _original(slots: list[Slot]) -> nn.Parameter:
    _, mod, attr = slots[0]
    return mod.parametrizations[attr].original


def _unique(slots: list[Slot]) -> list[tuple[nn.Module, str]]:
    return list({(id(m), a): (m, a) for _, m, a in slots}.values())


def attach(model: nn.Module, plan: Plan, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Register mask/fake-quant parametrizations on ``model`` in place, per the plan.

    ``masks`` (:attr:`WeightTarget.key` -> 0/1 tensor, as :func:`plan_masks` returns) fixes the
    initial masks; by default every layer starts dense and :func:`set_sparsity` prunes it
    (gradually during fine-tune, or at once). A tied tensor gets one parametrization shared by
    all its modules; a plan giving its aliases different knobs is refused before any change.

    Example:
        >>> lstm = nn.LSTM(3, 4)
        >>> _ = attach(lstm, Plan.uniform(["weight_ih_l0"], bits=4))
        >>> parametrize.is_parametrized(lstm, "weight_ih_l0")
        True
    """
    masks = masks or {}
    for t, lp in plan_targets(model, plan):
        mask = masks.get(t.key, torch.ones_like(t.param)).detach()
        with torch.no_grad():
            t.param.mul_(mask)
        p = _parametrization(lp, mask, t.axis)
        if p is not None:
            for mod, attr in t.slots():
                parametrize.register_parametrization(mod, attr, p)
    return model


def set_sparsity(model: nn.Module, fraction: float = 1.0) -> None:
    """Re-derive every prunable layer's magnitude mask at ``fraction`` of its target sparsity.

    Used for gradual magnitude pruning (Zhu & Gupta, 2017); ``fraction=1`` reaches each layer's
    exact planned sparsity. Codebook layers already clustered keep their masks.
    """
    from autocompress.compress._prune import magnitude_mask

    for p, slots in _parametrized(model):
        if isinstance(p, CodebookWeight) or p.target <= 0:
            continue
        p.mask.copy_(magnitude_mask(_original(slots), p.target * fraction))


def has_pending_codebooks(model: nn.Module) -> bool:
    """Whether some codebook layer has not been clustered yet."""
    return any(isinstance(p, PendingCodebook) for p, _ in _parametrized(model))


def convert_codebooks(model: nn.Module) -> None:
    """Cluster every pending codebook layer's (masked) weights into its codebook, in place."""
    for p, slots in _parametrized(model):
        if not isinstance(p, PendingCodebook):
            continue
        with torch.no_grad():
            w = _original(slots).detach() * p.mask
        for mod, attr in _unique(slots):
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        with torch.no_grad():
            getattr(slots[0][1], slots[0][2]).copy_(w)
        book = CodebookWeight(p.mask, w, p.bits)
        for mod, attr in _unique(slots):
            parametrize.register_parametrization(mod, attr, book)


def bake(model: nn.Module) -> nn.Module:
    """Replace every parametrization by the exact stored values and attach quant records.

    A tied tensor is baked once and stays one ``nn.Parameter`` shared by its modules; its record
    is filed under each of its state-dict names.
    """
    convert_codebooks(model)
    records = dict(quant_records(model))
    for p, slots in _parametrized(model):
        axis = getattr(p, "axis", 0)
        with torch.no_grad():
            w = _original(slots).detach() * p.mask
            if isinstance(p, CodebookWeight):
                table = fp16_exact(p.table())
                value = table[p.assign] * p.mask
                bits = (len(table) - 1).bit_length()  # len(table) == 2**bits
                rec = QuantRecord(bits, "codebook", codebook=table)
            elif isinstance(p, UniformFakeQuant):
                g = p.group
                scale = p.scale(w)
                value = uniform_codes(w, scale, p.bits, axis, g) * scale_grid(scale, w, axis, g)
                rec = QuantRecord(p.bits, "uniform", scale=scale.cpu(), axis=axis, group=g)
            elif isinstance(p, Fp16Weight):
                value, rec = fp16_exact(w), QuantRecord(16, "fp16")
            else:
                value, rec = w, None
        for mod, attr in _unique(slots):
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        with torch.no_grad():
            getattr(slots[0][1], slots[0][2]).copy_(value)
            for _, mod, attr in slots:
                bias = getattr(mod, "bias", None)
                if rec is not None and attr == "weight" and isinstance(bias, torch.Tensor):
                    bias.copy_(fp16_exact(bias))
        if rec is not None:
            for fqn, _, attr in slots:
                records[f"{fqn}.{attr}" if fqn else attr] = rec
    set_quant_records(model, records)
    return model
